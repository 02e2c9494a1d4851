#!/usr/bin/env bash
# The test command: set up .venv with the test tools and the hf extra (export parity tests),
# then run the whole suite.
#   bash scripts/test.sh            # everything (≈ 10 min on 2 CPU cores)
#   bash scripts/test.sh -m "not distributed"   # only the quick unit tests
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=dev,hf source scripts/setup_venv.sh
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test (e.g. a -k that matches nothing): not a failure.
if [ "$rc" -eq 5 ]; then echo "no tests collected"; exit 0; fi
exit "$rc"
