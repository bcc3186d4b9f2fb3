"""The embedded demo model: a tiny LLaDA-V with a word-level tokenizer for the synthetic shapes task.

It is a real LLaDA-V (same classes, same chat template, same special-token roles) scaled down so that it
trains from scratch on 2 CPU cores: 56-px crops of 4x4 SigLIP patches, a 2-layer vision tower, a 4-layer
language tower, and a tokenizer holding only the task's words plus LLaDA's special tokens. The special
ids differ from the 8B model's, which is why every id is a config field.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..configuration_llada_v import LladaVConfig
from ..image_layout_llada_v import default_grid_pinpoints
from ..image_processing_llada_v import LladaVImageProcessor
from ..processing_llada_v import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, VIDEO_TOKEN, LladaVProcessor
from .tasks import DEFAULT_TASK, get_task

# LLaDA's special tokens by role (the names of the real tokenizer).
BOS, EOS, START_HEADER, END_HEADER, EOT, MASK = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|mdm_mask|>",
)
UNK = "[UNK]"
ROLE_WORDS = ("system", "user", "assistant")

DEMO_CROP = 56  # 4x4 patches of 14 px per crop
DEMO_GRID = 3  # pinpoints (1x1)..(3x3) of 56 px
# Per task: the pinpoint grid, the tile cap and the language model's size. The scenes task's five-shape scenes
# are tiled 1x5 or 2x5 (pinpoints up to 5x5, features capped at 6 tiles' worth), and its descriptions need a
# wider language model.
TASK_MODELS = {
    "shapes": dict(
        grid=DEMO_GRID,
        max_tiles=4,
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    ),
    "scenes": dict(
        grid=5,
        max_tiles=6,
        text=dict(hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=4),
    ),
}


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def demo_words(task: str = DEFAULT_TASK) -> list[str]:
    """Task words, chat-template words and the system prompt's words, as the pre-tokenizer splits them."""
    text = " ".join([*get_task(task).vocabulary(), *ROLE_WORDS, DEFAULT_SYSTEM_PROMPT, "/think /no_think"])
    return sorted({piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text)})


def build_demo_tokenizer(task: str = DEFAULT_TASK) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for `task` (`"shapes"` or `"scenes"`): `[UNK]`, the words, LLaDA's special tokens,
    and `<image>` last.

    `<image>` (and `<video>`) take the last ids so that `tokenizer_vocab_size` (ids the sampler may emit)
    excludes them, as in the released model.
    """
    specials = [BOS, EOS, START_HEADER, END_HEADER, EOT, MASK]
    vocab = {UNK: 0}
    for token in [*demo_words(task), *specials, VIDEO_TOKEN, IMAGE_TOKEN]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = _pre_tokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens([*specials, VIDEO_TOKEN, IMAGE_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT, MASK, VIDEO_TOKEN, IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def demo_config(tokenizer: PreTrainedTokenizerFast, task: str = DEFAULT_TASK, **text_overrides) -> LladaVConfig:
    """The demo model's config for `task`: every special id read from the tokenizer."""
    if task not in TASK_MODELS:
        raise ValueError(f"unknown demo task {task!r}; expected one of {sorted(TASK_MODELS)}")
    shape = TASK_MODELS[task]
    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), **shape["text"], max_position_embeddings=1024)
    text.update(text_overrides)
    return LladaVConfig(
        text_config=text,
        vision_config=dict(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=DEMO_CROP,
            patch_size=14,
        ),
        image_grid_pinpoints=default_grid_pinpoints(DEMO_CROP, shape["grid"]),
        max_num_tiles=shape["max_tiles"],
        image_token_id=ids(IMAGE_TOKEN),
        mask_token_id=ids(MASK),
        bos_token_id=ids(BOS),
        eos_token_id=ids(EOS),
        pad_token_id=ids(EOS),
        eot_token_id=ids(EOT),
        start_header_token_id=ids(START_HEADER),
        end_header_token_id=ids(END_HEADER),
        user_role_token_id=ids("user"),
        assistant_role_token_id=ids("assistant"),
        tokenizer_vocab_size=ids(VIDEO_TOKEN),  # `<video>` and `<image>` are the last ids: never generated
    )


def build_demo_processor(config: LladaVConfig, tokenizer: PreTrainedTokenizerFast | None = None) -> LladaVProcessor:
    tokenizer = tokenizer if tokenizer is not None else build_demo_tokenizer()
    return LladaVProcessor(image_processor=LladaVImageProcessor.from_model_config(config), tokenizer=tokenizer)


def task_of(tokenizer) -> str:
    """The task a demo tokenizer was built for: the one whose words it holds ("five" is a scenes word)."""
    return "scenes" if "five" in tokenizer.get_vocab() else DEFAULT_TASK


def demo_model_dir() -> Path:
    """Where the shipped demo checkpoint lives inside the installed package."""
    return Path(__file__).with_name("checkpoint")
