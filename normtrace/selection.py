"""Which modules a lens observes: module classes, name globs, and the rule that finds activation modules.

One definition for every module lens (``OutputNorm``, ``ActivationRate``, ``OutputGradientNorm``, and a
user's): ``ModuleSelection`` holds ``include``/``exclude``, checks them once, says what it chose, and warns
when it chose nothing or very little of a large model.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from normtrace.recording import Recording, Target

ACTIVATIONS: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, name) for name in nn.modules.activation.__all__ if name != "MultiheadAttention"
)
"""The ``torch.nn`` activation classes (``is_activation`` also finds other libraries')."""

Selector = type[nn.Module] | str
"""A module class (matches instances and subclasses) or a glob over dotted module names: ``*`` and ``?``
stay within one dotted segment, ``**`` crosses segments (``"encoder.*"`` selects ``encoder``'s children,
``"encoder.**"`` everything below it, ``"**.attn"`` every ``attn`` at any depth, the top level included)."""

FEW_SELECTED = (50, 0.05)
"""A module lens warns when the model has at least 50 leaf modules and it selects fewer than 5% of them:
the default selection probably missed the model's activation classes."""


@functools.cache
def _activation_home(module_name: str) -> bool:
    """Whether a class defined in the Python module ``module_name`` is an activation: that module is
    called ``activation``, ``activations`` or ``activations_*``, the home of activation classes in
    transformers (``transformers.activations``) and timm (``timm.layers.activations``,
    ``timm.layers.activations_me``), and the name convention gives them. torch's own are listed in
    ``ACTIVATIONS`` instead (its ``activation`` module also holds attention). Cached by name, not by class:
    a class in a cache would outlive the module it was made for (the observed subclasses of ``observe``)."""
    if module_name.startswith("torch."):
        return False
    last = module_name.rsplit(".", 1)[-1]
    return last in ("activation", "activations") or last.startswith("activations_")


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation: an instance of a ``torch.nn`` activation class, or of a class
    (or a subclass of one) defined in a module called ``activation``, ``activations`` or ``activations_*``
    of any package (transformers' ``GELUActivation``, timm's ``GELUTanh``)."""
    if isinstance(module, ACTIVATIONS):
        return True
    return any(_activation_home(c.__module__) for c in type(module).__mro__[:-2])  # not nn.Module, object


@functools.cache
def glob_regex(pattern: str) -> re.Pattern[str]:
    """The compiled regex of a module-name glob (see ``Selector``); ``[...]``/``[!...]`` as in fnmatch."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**.", i):
            out.append(r"(?:.*\.)?")  # any number of leading segments, none included
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append(r"[^.]*")
            i += 1
        elif c == "?":
            out.append(r"[^.]")
            i += 1
        elif c == "[" and (end := pattern.find("]", i + 3 if pattern.startswith("[!", i) else i + 2)) > i:
            body = pattern[i + 1 : end].replace("\\", "\\\\")  # as fnmatch: a first "]" is literal
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append("[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def matches(name: str, module: nn.Module, selectors: Sequence[Selector]) -> bool:
    """Whether the module called ``name`` is one of ``selectors`` (an instance of a class, or a glob match)."""
    for sel in selectors:
        if isinstance(sel, str):
            if glob_regex(sel).match(name):
                return True
        elif isinstance(module, sel):
            return True
    return False


def check_selectors(lens: str, arg: str, selectors: Sequence[Selector] | Selector) -> tuple[Selector, ...]:
    """``selectors`` as a tuple, or a ``TypeError`` naming the lens and argument at fault."""
    out = (selectors,) if isinstance(selectors, (str, type)) else tuple(selectors)
    for sel in out:
        if not (isinstance(sel, str) or (isinstance(sel, type) and issubclass(sel, nn.Module))):
            raise TypeError(f"{lens}({arg}=...) takes nn.Module classes or name globs, got {sel!r}")
    return out


def selector_names(selectors: Sequence[Selector]) -> list[str]:
    """How ``meta.json`` spells selectors: globs as given, classes by their dotted path."""
    return [s if isinstance(s, str) else f"{s.__module__}.{s.__qualname__}" for s in selectors]


@dataclass
class ModuleSelection:
    """The modules a module lens observes: the activations (``is_activation``), plus ``include``, minus
    ``exclude`` (classes or name globs). Subclasses add their own fields and ``attach``."""

    include: Sequence[Selector] = ()
    exclude: Sequence[Selector] = ()

    def __post_init__(self) -> None:
        lens = type(self).__name__
        self.include = check_selectors(lens, "include", self.include)
        self.exclude = check_selectors(lens, "exclude", self.exclude)

    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether the module called ``name`` is observed."""
        chosen = is_activation(module) or matches(name, module, self.include)
        return chosen and not matches(name, module, self.exclude)

    def config(self) -> dict[str, Any]:
        """JSON-ready description for the run metadata (subclasses add their fields)."""
        return {
            "type": type(self).__name__,
            "include": selector_names(self.include),
            "exclude": selector_names(self.exclude),
        }

    def chosen(self, target: Target, recording: Recording, kind: str) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every selected module of ``target``, warning (note ``kind``) when that is
        none, or fewer than ``FEW_SELECTED`` of a large model's leaf modules."""
        chosen = [(name, module) for name, module in target.modules if self.selects(name, module)]
        lens, model = type(self).__name__, type(target.model).__name__
        hint = (
            "pass include=[...] with module classes (include=[nn.Linear]) or name globs "
            "(include=['encoder.layer.*.output'])"
        )
        if not chosen:
            recording.warn(
                kind,
                f"{lens} selects no module of {model}: it has no activation module (a function call such as "
                f"F.relu cannot be observed) and nothing matches include=...; {hint}",
                stacklevel=5,  # the user's attach call, past the lens's attach and this method
            )
            return chosen
        selected = {name for name, _ in chosen}
        for name in sorted(selected):
            base, sep, count = name.rpartition("#")
            if sep and count.isdigit() and base in selected:
                recording.warn(
                    f"{kind.removeprefix('no_')}_name_clash",
                    f"{lens}: module {name!r} of {model} has the name its rows give the call {int(count) + 1} "
                    f"of {base!r} in a pass ({base!r}, then {base + '#1'!r}, ...): if {base!r} runs that often "
                    f"in a pass, the two share one series. Rename one of them (add_module)",
                    stacklevel=5,
                )
        leaves = sum(1 for _, m in target.modules if next(m.children(), None) is None)
        least, share = FEW_SELECTED
        if leaves >= least and len(chosen) < share * leaves:
            names = ", ".join(n for n, _ in chosen[:3]) + (", …" if len(chosen) > 3 else "")
            recording.warn(
                f"few_{kind.removeprefix('no_')}",
                f"{lens} selects {len(chosen)} of the {leaves} leaf modules of {model} ({names}): its "
                f"activations may be functions or classes the default does not know; {hint}",
                stacklevel=5,
            )
        return chosen
