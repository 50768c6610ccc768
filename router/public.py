"""What a client may see of the server: the base model's public name, and text without server paths.

vLLM knows the base model by its folder (`--model /srv/.../SmolLM2-135M-Instruct`) and the
router by the registry's; neither belongs in an answer, a header or an error. `Public` holds
the replacements, built once from the config: every server path the router knows, and the
internal name of the zero adapter, mapped to what a client sees instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import RouterConfig


def public_name(name: str) -> str:
    """A model name fit to show: its last path component when it is a path (or a hub id's name)."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or name


@dataclass(frozen=True)
class Public:
    base: str
    """the base model's name in answers, headers and /v1/models."""
    hidden: tuple[tuple[str, str], ...] = ()
    """(server text, what the client sees instead), longest first so a path goes before its parent."""

    @classmethod
    def of(cls, config: RouterConfig) -> Public:
        base = public_name(config.base_name)
        pairs = {config.base_name: base, config.base_model: base}
        if config.base_adapter:
            pairs[config.base_adapter] = base  # for a client, the zero adapter is the base model
        for path, shown in ((config.base_model, base), (config.registry, "<registry>"),
                            (config.base_adapter_path, "<zero adapter>")):
            if path is not None:
                pairs.update({str(p): shown for p in (path, Path(path).resolve()) if "/" in str(p)})
        pairs.pop(base, None)  # the public name itself stays; also keeps `scrub` from undoing its own work
        return cls(base, tuple(sorted(pairs.items(), key=lambda pair: -len(pair[0]))))

    def scrub(self, text: str) -> str:
        for hidden, shown in self.hidden:
            if hidden in text:
                text = text.replace(hidden, shown)
        return text
