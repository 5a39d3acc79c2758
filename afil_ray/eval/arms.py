"""The arm language: an arm is one sampler setting, parsed once from ``kind[:key=value,...][@probe]`` into a typed
:class:`Arm` and carried as that object from the config to the report. A probe (``afil_ray/eval/probes.py``)
changes what the policy is shown or told on every episode of the arm: ``@blank_cameras``, ``@other_instruction``,
``@heldout_phrasing``.

An arm has two names, both derived here and nowhere else: ``name`` (``static:w=0.05``), which labels its
episodes in ``episodes.json`` and keys an evaluation's directory, and ``title`` (``static FIL w=0.05``), which the
pipeline's tables print. Code that needs an arm's kind or parameters reads ``arm.sampler``, never the name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from afil_ray.config import SAMPLER_KINDS, ConfigError, SamplerConfig

# The parameter that distinguishes arms of a kind (always shown in the name), and the keys an arm may set.
MAIN_KEY: dict[str, str | None] = {"success_only": None, "static": "w", "adaptive": "lam", "rank": "k",
                                   "outcome": "w"}
COMMON_KEYS = ("steps", "execute_steps", "fused_heads")
EXTRA_KEYS: dict[str, tuple[str, ...]] = {"rank": ("pick",)}
ARM_KEYS: dict[str, tuple[str, ...]] = {kind: (*((MAIN_KEY[kind],) if MAIN_KEY[kind] else ()),
                                               *EXTRA_KEYS.get(kind, ()), *COMMON_KEYS)
                                        for kind in SAMPLER_KINDS}
TITLES = {"static": "static FIL", "adaptive": "adaptive FIL", "rank": "rank",  # success_only: "success only"
          "outcome": "outcome-conditioned"}
REFERENCE_ARM = "success_only"
_SYMBOL = {"lam": "λ"}  # how the tables write a key


@dataclass(frozen=True)
class Arm:
    """One sampler setting: the resolved ``sampler`` and the keys its spec set (shown in its name)."""

    sampler: SamplerConfig
    set_keys: tuple[str, ...] = ()
    probe: str = ""  # one of afil_ray.eval.probes.PROBES, or "" (the policy sees and reads what the episode has)
    # other_instruction: the tasks whose instructions stand in for each other (the evaluated task list, in order)
    foils: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.sampler.kind

    @property
    def shown_keys(self) -> tuple[str, ...]:
        main = MAIN_KEY[self.kind]
        return (*((main,) if main else ()), *(k for k in self.set_keys if k != main))

    @property
    def name(self) -> str:
        """``success_only``, ``static:w=0.05``, ``adaptive:lam=1,steps=5``."""
        keys = self.shown_keys
        probe = f"@{self.probe}" if self.probe else ""
        if not keys:
            return self.kind + probe
        return self.kind + ":" + ",".join(f"{k}={_fmt(getattr(self.sampler, k))}" for k in keys) + probe

    @property
    def title(self) -> str:
        """``success only``, ``static FIL w=0.05``, ``adaptive FIL λ=1``, ``rank k=8 pick=random``: the name the
        result tables print."""
        probe = f", {self.probe.replace('_', ' ')}" if self.probe else ""
        if self.kind == REFERENCE_ARM and not self.set_keys:
            return "success only" + probe
        return " ".join([TITLES.get(self.kind, self.kind), *(f"{_SYMBOL.get(k, k)}={_fmt(getattr(self.sampler, k))}"
                                                               for k in self.shown_keys)]) + probe

    def exact(self) -> Arm:
        """The same arm with the heads run as two calls, so w = 0 reproduces success only bit for bit."""
        return dataclasses.replace(self, sampler=dataclasses.replace(self.sampler, fused_heads=False))


def make_arm(base: SamplerConfig, kind: str, **params: Any) -> Arm:
    """The arm ``kind`` with ``params`` over ``base``; ConfigError for a kind or key that does not apply."""
    spec = f"{kind}:{','.join(f'{k}={v}' for k, v in params.items())}" if params else kind
    if kind not in SAMPLER_KINDS:
        raise ConfigError(f"eval.arms: unknown sampler kind {kind!r} in arm {spec!r}; "
                          f"expected one of {', '.join(SAMPLER_KINDS)} (e.g. 'static:w=0.05', 'adaptive:lam=1')")
    for key in params:
        if key not in ARM_KEYS[kind]:
            raise ConfigError(f"eval.arms: key {key!r} does not apply to sampler {kind!r} in arm {spec!r}; "
                              f"keys for {kind}: {', '.join(ARM_KEYS[kind])}")
    return Arm(dataclasses.replace(base, kind=kind, **params), tuple(params))


def sampler_arm(sampler: SamplerConfig) -> Arm:
    """The arm of a plain sampler config (its main key shown)."""
    return Arm(sampler)


def parse_arm(spec: str, base: SamplerConfig) -> Arm:
    """``kind[:key=value,...]`` -> an :class:`Arm` over ``base``; ConfigError naming the spec if it is bad."""
    text = str(spec).strip()
    setting, at, probe = text.partition("@")
    if at:
        from afil_ray.eval.probes import check_probe

        check_probe(probe.strip(), text)
        return dataclasses.replace(parse_arm(setting, base), probe=probe.strip())
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in SAMPLER_KINDS:
        return make_arm(base, kind)  # raises, naming the kinds
    types = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(SamplerConfig)}
    params: dict[str, Any] = {}
    for item in (p.strip() for p in rest.split(",")) if rest.strip() else ():
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ConfigError(f"eval.arms: {item!r} in arm {text!r} is not of the form key=value")
        if key not in ARM_KEYS[kind]:
            raise ConfigError(f"eval.arms: key {key!r} does not apply to sampler {kind!r} in arm {text!r}; "
                              f"keys for {kind}: {', '.join(ARM_KEYS[kind])}")
        if key in params:
            raise ConfigError(f"eval.arms: key {key!r} given twice in arm {text!r}")
        params[key] = _coerce(value, types[key], key, text)
    return make_arm(base, kind, **params)


def parse_arms(specs: list[str], base: SamplerConfig) -> list[Arm]:
    """``eval.arms`` (``base`` alone when empty), each arm once."""
    arms = [parse_arm(s, base) for s in specs] or [sampler_arm(base)]
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"eval.arms: arm {duplicates[0]!r} is listed more than once")
    return arms


def check_policy_fits(arms: list[Arm], policy: Any) -> None:
    """ConfigError, before any episode, for an arm the policy cannot run: ranking by a critic it does not have,
    conditioning on outcome tokens it does not have."""
    for arm in arms:
        s = arm.sampler
        if s.kind == "outcome" and getattr(policy, "outcome", None) is None:
            raise ConfigError(f"eval.arms: arm {arm.name!r} conditions on outcome tokens, and this policy has none "
                              "(train one: afil-ray train train.mode=outcome policy.outcome_conditioning=true)")
        if s.kind == "rank" and s.pick == "critic" and s.k > 1 and getattr(policy, "critic", None) is None:
            raise ConfigError(f"eval.arms: arm {arm.name!r} ranks chunks by the success critic, and this policy has "
                              "none (train one: afil-ray branch, then afil-ray train train.mode=critic), or use "
                              "pick=random")


def reference_arm(arms: list[Arm]) -> str:
    """``success_only`` when it is an arm, else the first arm's name."""
    return REFERENCE_ARM if any(a.name == REFERENCE_ARM for a in arms) else arms[0].name


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _coerce(value: str, kind: type, key: str, spec: str) -> Any:
    try:
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(value)
            return value.lower() == "true"
        return kind(value)
    except ValueError:
        raise ConfigError(f"eval.arms: {key}={value!r} in arm {spec!r} is not a valid {kind.__name__}") from None
