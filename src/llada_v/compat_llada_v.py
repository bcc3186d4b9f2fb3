"""The transformers releases the remote code runs under, and the few API differences between them, in one place.

A checkpoint's remote code runs under whatever transformers its user has installed, so every difference
between the supported releases (4.57.1 to 5.x) is bridged here and nowhere else:

- `TRANSFORMERS_RANGE`: the supported releases. Importing this module under any other version raises one
  `ImportError` line that names the installed version and the range. Every remote-code entry module (config,
  model, processor, image processor) imports this module before anything else from transformers, so that line
  comes before any other failure.
- `PreTrainedConfig` (4.57 spells it `PretrainedConfig`), `SiglipVisionConfig`: re-exported.
- `ConfigBase`: the base of the configs, written as dataclasses (annotated fields with defaults and a
  `__post_init__(**kwargs)`). From 5.4 transformers turns every config subclass into a dataclass itself; on the
  earlier releases (4.57, 5.0-5.3) `ConfigBase` gives the same construction order with a plain `__init__`.
- `with_sub_configs`: declares a composite config's sub-configs in the form the installed release reads
  (5.21+: `sub_configs_defaults` of classes; 5.20: of `SubConfigSpec`; up to 5.19: `sub_configs`).
- `GenerationConfig`: with every field unset unless given, as in 5.x (4.57 fills in autoregressive defaults);
  `use_generation_config_class(model)`: 4.57 loads `generation_config.json` into a plain `GenerationConfig`.
- `init`: transformers' initialisers (`transformers.initialization`, 5.x) or torch's (4.57).
- `ALL_ATTENTION_FUNCTIONS`: transformers' attention registry, with `get_interface` (added in 5.1) on 4.57 and
  5.0 too; read lazily, so that loading a config or a processor does not import `transformers.modeling_utils`.
- `vision_tower_from_config`: SigLIP's vision transformer with the checkpoint's key layout
  (`vision_tower.embeddings/encoder/post_layernorm`); 4.57 and 5.0-5.5 wrap it in `SiglipVisionModel.vision_model`.

The supported range, what was tested and how: docs/usage.md#supported-transformers-versions.
"""

import functools
import inspect
import re
from dataclasses import is_dataclass

import transformers

# The supported transformers releases: [TRANSFORMERS_MIN, TRANSFORMERS_BELOW). CI tests the lowest release and the
# newest published one (TRANSFORMERS_TESTED) with the golden parity subset (tests/test_transformers_range.py).
# (4.57.0 was yanked from PyPI: 4.57.1 is the lowest installable release of the line.)
TRANSFORMERS_MIN = (4, 57, 1)
TRANSFORMERS_BELOW = (6, 0, 0)
TRANSFORMERS_RANGE = ">={}.{}.{},<{}".format(*TRANSFORMERS_MIN, TRANSFORMERS_BELOW[0])
TRANSFORMERS_TESTED = ("4.57.1", "5.25.0")


def parse_version(version: str) -> tuple[int, int, int]:
    """`"5.12.0"`, `"5.26.0.dev0"`, `"5.3.0rc1"` -> the release numbers `(5, 12, 0)` (`(5, 26, 0)`, `(5, 3, 0)`)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read a release number from the version string {version!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def unsupported_message(version: str) -> str | None:
    """The one-line error for an unsupported transformers `version`, or None when it is in the range."""
    if TRANSFORMERS_MIN <= parse_version(version) < TRANSFORMERS_BELOW:
        return None
    return (
        f"LLaDA-V's remote code supports transformers {TRANSFORMERS_RANGE} (tested {TRANSFORMERS_TESTED[0]} to "
        f"{TRANSFORMERS_TESTED[1]}); the installed version is {version}: "
        f"pip install 'transformers{TRANSFORMERS_RANGE}'"
    )


_message = unsupported_message(transformers.__version__)
if _message is not None:
    raise ImportError(_message)

# Below this line every name exists in all supported releases.
from transformers import GenerationConfig as _GenerationConfig  # noqa: E402
from transformers import SiglipVisionConfig  # noqa: E402
from transformers import configuration_utils as _configuration_utils  # noqa: E402

# 4.57 spells it PretrainedConfig.
PreTrainedConfig = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig

# 5.x leaves every GenerationConfig field unset (None) unless given; 4.57 fills in autoregressive defaults
# (max_length 20, top_k 50, use_cache True, ...) that would steer the diffusion sampler.
_FILLED_DEFAULTS = tuple(
    name
    for name, value in vars(_GenerationConfig()).items()
    if value is not None and not name.startswith("_") and name != "transformers_version"
)
if _FILLED_DEFAULTS:

    class GenerationConfig(_GenerationConfig):
        """transformers' GenerationConfig with every field unset unless given, as in 5.x."""

        def __init__(self, **kwargs):
            for name in _FILLED_DEFAULTS:
                kwargs.setdefault(name, None)
            super().__init__(**kwargs)

else:
    GenerationConfig = _GenerationConfig

try:  # 5.0 and later: initialisers that skip the weights a checkpoint has loaded
    from transformers import initialization as init
except ImportError:  # 4.57 calls `_init_weights` only for modules with missing weights: plain torch initialisers
    import torch

    class init:  # noqa: N801 (stands in for the module)
        @staticmethod
        @torch.no_grad()
        def copy_(tensor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            return tensor.copy_(other)

        normal_ = staticmethod(torch.nn.init.normal_)


# 5.20 introduced `SubConfigSpec`; 5.21 accepts plain classes in `sub_configs_defaults` too.
_SubConfigSpec = getattr(_configuration_utils, "SubConfigSpec", None)


def with_sub_configs(**config_classes: type):
    """Class decorator: declare a composite config's sub-configs (attribute name -> config class).

    The config's own `__post_init__` builds the sub-config objects from dicts (every release leaves that to
    the model from 5.0 to 5.19); this only tells transformers which attributes are sub-configs (serialisation,
    the attention implementation set on every sub-config, `get_text_config`).
    """

    def declare(cls: type) -> type:
        if _SubConfigSpec is not None:
            cls.sub_configs_defaults = {key: _SubConfigSpec(config_class=c) for key, c in config_classes.items()}
        else:
            cls.sub_configs = dict(config_classes)
        return cls

    return declare


if is_dataclass(PreTrainedConfig):  # 5.4 and later
    ConfigBase = PreTrainedConfig
else:  # 4.57, 5.0 - 5.3: configs take everything through __init__(**kwargs)

    class ConfigBase(PreTrainedConfig):
        """Dataclass-style construction on a release whose `PreTrainedConfig` is a plain class: the annotated
        class attributes of the subclasses are the fields; `__init__` sets them from the keyword arguments (or
        their defaults) and calls `__post_init__` with the other keyword arguments, which ends (through
        `super().__post_init__(**kwargs)`) in `PreTrainedConfig.__init__`, as the dataclass releases do.
        """

        def __init__(self, **kwargs):
            for name, default in _config_fields(type(self)).items():
                setattr(self, name, kwargs.pop(name, default))
            self.__post_init__(**kwargs)

        def __post_init__(self, **kwargs):
            # PreTrainedConfig.__init__ sets its own arguments (dtype, architectures, ...) and the rest as
            # attributes: hand it the fields' current values so none is reset to its default.
            fields = {name: getattr(self, name) for name in _config_fields(type(self))}
            PreTrainedConfig.__init__(self, **fields, **kwargs)

    def _config_fields(cls: type) -> dict:
        """The annotated class attributes of `cls` and its bases below `ConfigBase`, with their defaults."""
        fields = {}
        for klass in reversed(cls.__mro__):
            if klass is not ConfigBase and issubclass(klass, ConfigBase):
                for name in inspect.get_annotations(klass):
                    fields[name] = klass.__dict__[name]
        return fields


@functools.cache
def _attention_functions():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # 5.1 and later
        return ALL_ATTENTION_FUNCTIONS

    class AttentionFunctions:
        """The 4.57 / 5.0 registry with the `get_interface(name, default)` lookup of the later releases."""

        def __getitem__(self, name):
            return ALL_ATTENTION_FUNCTIONS[name]

        def __contains__(self, name):
            return name in ALL_ATTENTION_FUNCTIONS

        def get_interface(self, attn_implementation, default):
            if attn_implementation in (None, "eager"):
                return default
            if attn_implementation not in ALL_ATTENTION_FUNCTIONS:
                raise KeyError(f"`{attn_implementation}` is not a registered attention implementation")
            return ALL_ATTENTION_FUNCTIONS[attn_implementation]

    return AttentionFunctions()


def vision_tower_from_config(vision_config: PreTrainedConfig):
    """The SigLIP vision transformer for `vision_config` (embeddings, encoder, post_layernorm as direct children)."""
    from transformers import AutoModel

    model = AutoModel.from_config(vision_config)
    inner = getattr(model, "vision_model", None)  # 4.57, 5.0-5.5: SiglipVisionModel(vision_model=...)
    return inner if inner is not None and hasattr(inner, "encoder") else model


def use_generation_config_class(model) -> None:
    """Make `model.generation_config` an instance of `model.generation_config_class`, which 5.x loads
    `generation_config.json` into; 4.57 always uses a plain `GenerationConfig`."""
    config, cls = getattr(model, "generation_config", None), model.generation_config_class
    if config is not None and type(config).__name__ != cls.__name__:
        model.generation_config = cls.from_dict(config.to_diff_dict())


def __getattr__(name: str):
    if name == "ALL_ATTENTION_FUNCTIONS":
        return _attention_functions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALL_ATTENTION_FUNCTIONS",  # noqa: F822 (module __getattr__)
    "ConfigBase",
    "init",
    "GenerationConfig",
    "PreTrainedConfig",
    "SiglipVisionConfig",
    "TRANSFORMERS_RANGE",
    "TRANSFORMERS_TESTED",
    "parse_version",
    "unsupported_message",
    "use_generation_config_class",
    "vision_tower_from_config",
    "with_sub_configs",
]
