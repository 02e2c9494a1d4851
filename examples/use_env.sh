# Sourced (from the repository root) by the scripts in examples/: find the project's environment.
# The shell's own environment is kept when it can run us (torchrun on PATH, and `python` finds
# torch and megatron-core: an activated env, a container's python); otherwise the README's
# .venv (created by `bash scripts/demo.sh` or `bash scripts/test.sh`) is activated.
_wsm_env_ok() {
    command -v torchrun >/dev/null 2>&1 && python -c 'import importlib.util as u, sys
sys.exit(not (u.find_spec("torch") and u.find_spec("megatron.core")))' >/dev/null 2>&1
}
if ! _wsm_env_ok; then
    if [ -f .venv/bin/activate ]; then
        # shellcheck disable=SC1091
        . .venv/bin/activate
    fi
    if ! _wsm_env_ok; then
        echo "$0: no environment with torchrun, torch and megatron-core: run" \
            "'bash scripts/demo.sh' once (it creates .venv) or activate one that has the" \
            "package (pip install -e .)" >&2
        exit 1
    fi
fi
unset -f _wsm_env_ok
