"""Tokenizer helpers for conversion and tests (package-only code, not shipped as remote code).

- `build_converted_tokenizer`: the released LLaDA tokenizer (126,349 entries) plus `<image>` as a special
  token at the next free id, 126349, and the LLaDA-V chat template. Generation can never emit it because the
  sampler only produces ids below the released tokenizer's size.
- `build_processor`: the converted tokenizer and an image processor matching a `LladaVConfig`, as one
  `LladaVProcessor` (a folder it is saved to gets its remote code from `checkpoint_io.write_remote_code`).
- `write_standin_released_tokenizer` / `build_standin_tokenizer`: the real `tokenizer.json` is not available
  here, so tests use a byte-level BPE whose 269 special tokens sit at their real ids (126080..126348) and whose
  template words (`system` 9125, `user` 882, `assistant` 598, `\\n` 198, `\\n\\n` 271) have their real ids.
  Other text tokenises to byte tokens whose ids are NOT the real ones.
"""

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..image_processing_llada_v import LladaVImageProcessor
from ..processing_llada_v import CHAT_TEMPLATE, IMAGE_TOKEN, LladaVProcessor

RELEASED_TOKENIZER_SIZE = 126349  # entries of the released LLaDA tokenizer (ids 0..126348)
IMAGE_TOKEN_ID = RELEASED_TOKENIZER_SIZE  # `<image>`: the next free id
FIRST_SPECIAL_ID = 126080

# Llama-3's pre-tokenizer split (the LLaDA vocabulary shares its low ids, e.g. 198 = "\n", 271 = "\n\n").
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_NAMED_SPECIALS = {
    126080: "<|startoftext|>",
    126081: "<|endoftext|>",
    126082: "[CLS]",
    126083: "[gMASK]",
    126336: "<|mdm_mask|>",
    126340: "<role>",
    126341: "</role>",
    126342: "<|arithmetic_start|>",
    126343: "<|arithmetic_end|>",
    126344: "<|number_start|>",
    126345: "<|number_end|>",
    126346: "<|start_header_id|>",
    126347: "<|end_header_id|>",
    126348: "<|eot_id|>",
}
_EXTRA_SPECIALS = [
    "<|mdm_mask|>",
    "<role>",
    "</role>",
    "<|arithmetic_start|>",
    "<|arithmetic_end|>",
    "<|number_start|>",
    "<|number_end|>",
]
# Words of the chat template whose real ids the stand-in reproduces (real LLaDA / Llama-3 ids).
_STANDIN_WORDS = {"system": 9125, "user": 882, "assistant": 598}


def llada_special_tokens() -> dict[int, str]:
    """The 269 special tokens of the released LLaDA tokenizer, id -> content (ids 126080..126348).

    Unnamed ids are `<|reserved_token_{id - 126084}|>`, as in LLaDA-8B-Instruct's `tokenizer_config.json`.
    """
    return {
        token_id: _NAMED_SPECIALS.get(token_id, f"<|reserved_token_{token_id - 126084}|>")
        for token_id in range(FIRST_SPECIAL_ID, RELEASED_TOKENIZER_SIZE)
    }


def build_converted_tokenizer(
    released_tokenizer_dir: str | os.PathLike,
    image_token: str = IMAGE_TOKEN,
    image_token_id: int = IMAGE_TOKEN_ID,
) -> PreTrainedTokenizerBase:
    """Load the released LLaDA tokenizer and add `<image>` as a special token at `image_token_id`.

    Args:
        released_tokenizer_dir: folder with the released `tokenizer.json` / `tokenizer_config.json`.
        image_token: the placeholder string (`"<image>"`).
        image_token_id: the id it must get (126349, `LladaVConfig.image_token_id`); a tokenizer of another size
            is refused rather than silently giving the placeholder an id the model does not expect.

    Returns:
        The tokenizer with `<image>` added and the LLaDA-V chat template set.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(released_tokenizer_dir))
    existing = tokenizer.convert_tokens_to_ids(image_token)
    if existing is not None and existing != tokenizer.unk_token_id and image_token in tokenizer.get_vocab():
        if existing != image_token_id:
            raise ValueError(f"the tokenizer already has {image_token!r} at id {existing}, expected {image_token_id}")
    else:
        if len(tokenizer) != image_token_id:
            raise ValueError(
                f"the released tokenizer has {len(tokenizer)} entries; {image_token!r} would get id {len(tokenizer)} "
                f"but the model expects image_token_id {image_token_id}"
            )
        token = AddedToken(image_token, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
        got = tokenizer.convert_tokens_to_ids(image_token)
        if got != image_token_id:
            raise ValueError(f"{image_token!r} was added at id {got}, expected {image_token_id}")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike,
    config=None,
    image_processor: LladaVImageProcessor | None = None,
) -> LladaVProcessor:
    """The `LladaVProcessor` to save next to a converted checkpoint.

    Args:
        tokenizer: a converted tokenizer, or the released tokenizer folder (converted here).
        config (`LladaVConfig`, *optional*): builds the image processor with `LladaVImageProcessor.from_model_config`.
        image_processor (*optional*): used as is instead (exactly one of `config` / `image_processor`).
    """
    if (config is None) == (image_processor is None):
        raise ValueError("pass exactly one of `config` and `image_processor`")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        image_token_id = getattr(config, "image_token_id", IMAGE_TOKEN_ID)
        tokenizer = build_converted_tokenizer(tokenizer, image_token_id=image_token_id)
    if image_processor is None:
        image_processor = LladaVImageProcessor.from_model_config(config)
    if config is not None and tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        raise ValueError(
            f"tokenizer id of {IMAGE_TOKEN!r} ({tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}) differs from "
            f"config.image_token_id ({config.image_token_id})"
        )
    return LladaVProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ---------------------------------------------------------------------- test stand-in


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> unicode table in vocabulary order (so byte 10, "\\n", is token 198 as in Llama-3)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _standin_backend() -> Tokenizer:
    alphabet = _byte_level_alphabet()
    vocab: dict[str, int | None] = {char: index for index, char in enumerate(alphabet)}
    merges = [("Ċ", "Ċ")]
    vocab["ĊĊ"] = 271
    for word, word_id in _STANDIN_WORDS.items():
        prefix = word[0]
        for char in word[1:]:
            merges.append((prefix, char))
            prefix += char
            vocab.setdefault(prefix, None)
        vocab[word] = word_id
    used = {value for value in vocab.values() if value is not None}
    free = (i for i in range(len(alphabet), FIRST_SPECIAL_ID) if i not in used)
    for token, value in list(vocab.items()):
        if value is None:
            vocab[token] = next(free)
    used = set(vocab.values())
    for i in range(len(alphabet), FIRST_SPECIAL_ID):
        if i not in used:  # fill every id so that len(tokenizer) and decoding behave like the real vocabulary
            vocab[f"<|standin_{i}|>"] = i
    for token_id, content in llada_special_tokens().items():
        vocab[content] = token_id
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(content, special=True, normalized=False) for content in llada_special_tokens().values()]
    )
    return backend


def write_standin_released_tokenizer(folder: str | os.PathLike) -> Path:
    """Write a stand-in of the released LLaDA tokenizer folder (126,349 entries, no `<image>`).

    `tokenizer_config.json` follows LLaDA-8B-Instruct's: same special tokens, BOS/EOS/pad, no BOS added
    automatically, and the original LLaDA chat template.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _standin_backend().save(str(folder / "tokenizer.json"))
    special = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, content in llada_special_tokens().items()
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": special,
        "additional_special_tokens": list(_EXTRA_SPECIALS),
        "bos_token": "<|startoftext|>",
        "chat_template": (
            "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
            "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
            "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
            "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        ),
        "clean_up_tokenization_spaces": False,
        "cls_token": "[CLS]",
        "eos_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder


def build_standin_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A converted stand-in tokenizer (`<image>` at 126349), built through `build_converted_tokenizer`.

    Args:
        folder: where the stand-in "released" tokenizer files are written (a temporary directory in tests).
    """
    return build_converted_tokenizer(write_standin_released_tokenizer(folder))


__all__ = [
    "IMAGE_TOKEN_ID",
    "RELEASED_TOKENIZER_SIZE",
    "build_converted_tokenizer",
    "build_processor",
    "build_standin_tokenizer",
    "llada_special_tokens",
    "write_standin_released_tokenizer",
]
