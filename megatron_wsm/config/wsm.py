"""Window checkpoints for Warmup-Stable-Merge: :class:`WSMConfig`."""

from __future__ import annotations

import dataclasses

from megatron_wsm.config.fields import ConfigError, flag_field


@dataclasses.dataclass
class WSMConfig:
    """Window checkpoints for Warmup-Stable-Merge (docs/merge.md, docs/schedule.md)."""

    GROUP = "WSM window checkpoints"

    wsm_interval: int | None = flag_field(None, "window save every N iters")
    wsm_interval_tokens: int | None = flag_field(None, "... or every N tokens")
    wsm_window: int | None = flag_field(None, "keep the last N iterations")
    wsm_window_tokens: int | None = flag_field(None, "... or the last N tokens")
    wsm_save: str | None = flag_field(None, "default: <save>/wsm_window")
    wsm_async: bool = flag_field(False, "window saves in the background")
    wsm_eval_methods: str | None = flag_field(
        None,
        "at every --eval-interval also evaluate the merge of the window, built in memory, "
        "for these merge methods (comma list, e.g. 1-sqrt,mean; the merge tool's defaults)",
    )

    @property
    def eval_methods(self) -> list[str]:
        """The ``--wsm-eval-methods`` names, in the order given (empty when off)."""
        return [m.strip() for m in (self.wsm_eval_methods or "").split(",") if m.strip()]

    @property
    def enabled(self) -> bool:
        """Whether window checkpoints are saved at all."""
        return self.wsm_interval is not None or self.wsm_interval_tokens is not None

    def validate(self, full_save_dir: str | None, tokens_per_iter: int) -> None:
        """Own-field checks (``full_save_dir``: ``--save``; ``tokens_per_iter``: global
        batch × sequence length)."""
        if self.wsm_interval is not None and self.wsm_interval_tokens is not None:
            raise ConfigError("give --wsm-interval or --wsm-interval-tokens, not both")
        if self.wsm_window is not None and self.wsm_window_tokens is not None:
            raise ConfigError("give --wsm-window or --wsm-window-tokens, not both")
        if self.enabled and not (self.wsm_save or full_save_dir):
            raise ConfigError(
                "window checkpoints (--wsm-interval) need --wsm-save DIR or --save DIR"
            )
        for flag, value in (
            ("--wsm-interval", self.wsm_interval),
            ("--wsm-interval-tokens", self.wsm_interval_tokens),
            ("--wsm-window", self.wsm_window),
            ("--wsm-window-tokens", self.wsm_window_tokens),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if (self.wsm_window is not None or self.wsm_window_tokens is not None) and not self.enabled:
            raise ConfigError("--wsm-window needs --wsm-interval (or --wsm-interval-tokens)")
        if self.wsm_interval_tokens is not None and self.wsm_interval_tokens % tokens_per_iter:
            raise ConfigError(
                f"--wsm-interval-tokens {self.wsm_interval_tokens} must be a multiple of the "
                f"tokens per iteration ({tokens_per_iter} = global batch × seq length)"
            )
        if self.wsm_eval_methods is not None:
            from megatron_wsm.coefficients import METHODS

            named = [m for m in METHODS if m != "custom"]
            unknown = [m for m in self.eval_methods if m not in named]
            if unknown or not self.eval_methods:
                raise ConfigError(
                    f"--wsm-eval-methods {self.wsm_eval_methods!r}: give a comma list of "
                    f"{', '.join(named)}"
                )
            if not self.enabled:
                raise ConfigError(
                    "--wsm-eval-methods merges the saved window: it needs --wsm-interval "
                    "(or --wsm-interval-tokens)"
                )

    def interval_iters(self, tokens_per_iter: int) -> int | None:
        """The window-save interval in iterations (token flags converted), None when off."""
        if self.wsm_interval is not None:
            return self.wsm_interval
        if self.wsm_interval_tokens is not None:
            return self.wsm_interval_tokens // tokens_per_iter
        return None

    def window_size(self, tokens_per_iter: int) -> int | None:
        """Checkpoints in a full window (``window / interval + 1``: the oldest anchors it), or
        None when every window checkpoint is kept."""
        interval = self.interval_iters(tokens_per_iter)
        if interval is None:
            return None
        if self.wsm_window is not None:
            return self.wsm_window // interval + 1
        if self.wsm_window_tokens is not None:
            return self.wsm_window_tokens // (interval * tokens_per_iter) + 1
        return None
