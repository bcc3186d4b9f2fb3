"""Training data for LLaDA-V: a dataset over LLaVA-format conversations and a padding collator.

Package-only code (not shipped as remote code). Notable facts:
- records are LLaVA's: `{"id", "image": str | [str], "video": folder | [frames], "conversations":
  [{"from": "human" | "gpt" | "system", "value": ...}]}` in a JSON list or a JSONL file; paths are relative to
  `image_folder` / `video_folder`;
- text goes through the processor's chat template and the processor expands every `<image>` / `<video>` to
  exactly the number of image tokens the model packs (`image_layout_llada_v`): nothing is recounted here;
- labels follow the official `preprocess_llada` rule (docs/parity.md Q20): assistant turns are
  supervised entirely, header included; in system/user turns only BOS, `<|start_header_id|>`,
  `<|end_header_id|>` and `<|eot_id|>` are supervised; image tokens never are;
- padding (collator): `"official"` (default) reproduces the official batches exactly: every sample is
  right-padded with *supervised* EOS up to the longest sample counted with one token per image placeholder,
  then with unsupervised, attention-masked padding up to the longest expanded sample (see `LladaVDataCollator`);
  `"masked"` pads with unsupervised, attention-masked tokens only;
- a sample longer than `max_length` loses whole trailing text-only exchanges (`length_policy="drop_turns"`) or
  is a bad sample (`"reject"`); image tokens are never truncated;
- which supervised tokens a training step masks: by default the model draws `t ~ U(0, 1)` per sample
  (docs/parity.md Q19); `MaskCountSampling` wraps the collator to draw the *number* of masked tokens instead (LLaDA's
  equivalent lower-variance estimator), for short answers;
- bad samples (missing files, placeholder/image mismatch, undecodable images, too long) are logged with their
  index and skipped, or raise `BadSampleError` (`on_bad_sample="raise"`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from ..image_layout_llada_v import LAYOUT_SINGLE
from ..image_processing_llada_v import VIDEO_FILE_SUFFIXES
from ..modeling_llada_v import IGNORE_INDEX
from ..modeling_llada_v import find_turns as chat_turns
from ..processing_llada_v import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN, VIDEO_TOKEN

logger = logging.getLogger(__name__)

# Template tokens of the LLaDA chat template (`processing_llada_v.CHAT_TEMPLATE` writes these strings).
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ON_BAD_SAMPLE = ("skip", "raise")
LENGTH_POLICIES = ("drop_turns", "reject")
PADDING_MODES = ("official", "masked")
MASK_SAMPLING = ("time", "count")
_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class BadSampleError(ValueError):
    """A training sample that cannot be used; `index` is its position in the data file."""

    def __init__(self, index: int, reason: str, sample_id: Any = None):
        self.index = index
        self.reason = reason
        self.sample_id = sample_id
        named = f" (id {sample_id!r})" if sample_id is not None else ""
        super().__init__(f"bad sample {index}{named}: {reason}")


# ----------------------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True)
class TemplateTokens:
    """Ids that delimit turns in tokenised conversations.

    Args:
        bos_id: `<|startoftext|>`.
        start_header_id, end_header_id, eot_id: `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`.
        assistant_role_ids: the ids of the word `assistant` between the header tokens (`(598,)` for LLaDA).
        image_token_id: the token every image is expanded to (never supervised).
    """

    bos_id: int
    start_header_id: int
    end_header_id: int
    eot_id: int
    assistant_role_ids: tuple[int, ...]
    image_token_id: int

    @property
    def always_supervised(self) -> frozenset[int]:
        # The official rule unmasks these template tokens wherever they occur (docs/parity.md Q20).
        return frozenset((self.bos_id, self.start_header_id, self.end_header_id, self.eot_id))

    @classmethod
    def from_processor(cls, processor: Any) -> TemplateTokens:
        """Read the ids from a `LladaVProcessor` (its tokenizer and `image_token_id`)."""
        tokenizer = processor.tokenizer
        ids = {}
        for name, token in (("start_header_id", START_HEADER), ("end_header_id", END_HEADER), ("eot_id", END_OF_TURN)):
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"the tokenizer has no single token for {token!r} (encodes to {encoded})")
            ids[name] = encoded[0]
        if tokenizer.bos_token_id is None:
            raise ValueError(
                "the tokenizer has no bos_token; the LLaDA chat template starts every conversation with it"
            )
        assistant = tuple(tokenizer.encode("assistant", add_special_tokens=False))
        if not assistant:
            raise ValueError("the tokenizer encodes 'assistant' to no tokens")
        return cls(
            bos_id=tokenizer.bos_token_id,
            assistant_role_ids=assistant,
            image_token_id=processor.image_token_id,
            **ids,
        )


class Turn(NamedTuple):
    """A header-delimited turn of a tokenised conversation: positions `[start, end)`, its role."""

    start: int
    end: int
    is_assistant: bool
    has_image: bool


def find_turns(input_ids: Sequence[int], tokens: TemplateTokens) -> list[Turn]:
    """The turns of tokenised conversation ids (`modeling_llada_v.find_turns`), with their role and whether
    they hold image tokens. Raises `ValueError` for a header without `<|end_header_id|>`."""
    ids = list(input_ids)
    turns = []
    for turn in chat_turns(ids, tokens.start_header_id, tokens.end_header_id, tokens.eot_id):
        if turn.header_end is None:
            raise ValueError(f"the turn header at position {turn.start} has no {END_HEADER} before position {turn.end}")
        has_image = tokens.image_token_id in ids[turn.start : turn.end]
        turns.append(Turn(turn.start, turn.end, turn.role == tokens.assistant_role_ids, has_image))
    return turns


def build_labels(input_ids: Sequence[int], tokens: TemplateTokens) -> list[int]:
    """Training labels of a tokenised conversation (the official `preprocess_llada` rule, docs/parity.md Q20).

    Assistant turns, from their `<|start_header_id|>` to their `<|eot_id|>`, are supervised entirely. Elsewhere
    only the template tokens BOS, `<|start_header_id|>`, `<|end_header_id|>` and `<|eot_id|>` are supervised
    (docs/parity.md Q20: the official code unmasks them in system and user turns too); everything else, and every
    image token, is `IGNORE_INDEX`.

    Args:
        input_ids: ids of one conversation, images already expanded to `tokens.image_token_id`.
        tokens: the template ids (`TemplateTokens.from_processor`).
    """
    ids = list(input_ids)
    keep = tokens.always_supervised
    labels = [t if t in keep else IGNORE_INDEX for t in ids]
    for turn in find_turns(ids, tokens):
        if turn.is_assistant:
            labels[turn.start : turn.end] = ids[turn.start : turn.end]
    return [IGNORE_INDEX if t == tokens.image_token_id else label for t, label in zip(ids, labels)]


# ----------------------------------------------------------------------------------------------------------
# Records


def load_records(data: str | os.PathLike | Sequence[Mapping]) -> list[dict]:
    """LLaVA records from a `.json` list, a `.jsonl` file (one record per line) or an in-memory list."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            records = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no} is not valid JSON: {err}") from err
            return records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); use a .jsonl suffix for one record per line") from err
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of records, got {type(records).__name__}")
        return records
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return list(data)
    raise TypeError(f"data must be a path or a list of records, got {type(data).__name__}")


def _move_single_image_first(text: str) -> str:
    # LLaVA's `preprocess_multimodal`: a turn with exactly one `<image>` gets it moved to the front, followed by
    # a newline ("<image>\n{rest}"), which is what the released model was trained on.
    if text.count(IMAGE_TOKEN) == 1 and not text.startswith(IMAGE_TOKEN):
        text = IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()
    return text.strip()


class _Prepared(NamedTuple):
    messages: list[dict]
    images: list[str]
    video: list[str] | None
    sample_id: Any


# ----------------------------------------------------------------------------------------------------------
# Dataset


class LladaVDataset(Dataset):
    r"""
    LLaVA-format conversations tokenised for LLaDA-V training, one sample per record.

    Each item is a dict of tensors: `input_ids` and `labels` (1-D, equal length; images expanded to image
    tokens), and for samples with images or a video `pixel_values`, `image_sizes`, `image_layouts`,
    `image_num_crops` (as `LladaVProcessor` returns them). Text-only samples have only `input_ids`/`labels`.

    Args:
        data: a `.json` file (a list of records), a `.jsonl` file, or a list of records.
        processor (`LladaVProcessor`): tokenizer, chat template and image processor of the model.
        image_folder: base folder of relative `image` paths.
        video_folder: base folder of relative `video` paths (defaults to `image_folder`). A video is a folder of
            frame images (sorted by name) or a list of frame files; video files must be decoded to frames first.
        system_prompt: the system turn of every sample without its own `system` message; `None` or `""` drops
            it. Defaults to LLaDA-V's system prompt (what the released model was trained with).
        max_length: the longest allowed sample in tokens after image expansion (`None`: no limit).
        length_policy: `"drop_turns"` removes trailing text-only (user, assistant) exchanges until the sample
            fits (at least one assistant turn must remain); `"reject"` makes any over-long sample a bad sample.
            Image tokens are never truncated.
        on_bad_sample: `"skip"` logs a warning with the sample's index and reason and leaves it out (problems
            found when an item is loaded are replaced by the next good sample); `"raise"` raises
            `BadSampleError`.
        check_files: check at construction that every image/video path exists (cheap `stat` calls), so bad
            samples are reported before training starts.
    """

    def __init__(
        self,
        data: str | os.PathLike | Sequence[Mapping],
        processor: Any,
        image_folder: str | os.PathLike | None = None,
        video_folder: str | os.PathLike | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        max_length: int | None = None,
        length_policy: str = "drop_turns",
        on_bad_sample: str = "skip",
        check_files: bool = True,
    ) -> None:
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if length_policy not in LENGTH_POLICIES:
            raise ValueError(f"length_policy must be one of {LENGTH_POLICIES}, got {length_policy!r}")
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        self.processor = processor
        self.tokens = TemplateTokens.from_processor(processor)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.video_folder = Path(video_folder) if video_folder is not None else self.image_folder
        self.system_prompt = system_prompt or None
        self.max_length = max_length
        self.length_policy = length_policy
        self.on_bad_sample = on_bad_sample
        self.check_files = check_files
        # index in the data file -> reason, for every sample left out (construction or loading).
        self.bad_samples: dict[int, str] = {}

        records = load_records(data)
        self._prepared: list[_Prepared] = []
        self._source_index: list[int] = []
        for index, record in enumerate(records):
            try:
                prepared = self._prepare(index, record)
            except BadSampleError as err:
                self._bad(err)
                continue
            self._prepared.append(prepared)
            self._source_index.append(index)
        if self.bad_samples:
            logger.warning(
                "%d of %d samples left out as bad (indices %s%s)",
                len(self.bad_samples),
                len(records),
                sorted(self.bad_samples)[:20],
                "..." if len(self.bad_samples) > 20 else "",
            )
        if not self._prepared:
            raise ValueError(f"no usable samples among the {len(records)} records")

    def __len__(self) -> int:
        return len(self._prepared)

    def source_index(self, position: int) -> int:
        """Index in the data file of the sample at dataset position `position`."""
        return self._source_index[position]

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        n = len(self._prepared)
        if not -n <= position < n:
            raise IndexError(f"dataset position {position} out of range for {n} samples")
        position %= n
        for offset in range(n):
            candidate = (position + offset) % n
            index = self._source_index[candidate]
            if index in self.bad_samples:
                continue
            try:
                return self.encode(candidate)
            except BadSampleError as err:
                self._bad(err)
        raise ValueError(f"every one of the {n} samples turned out bad; see the logged reasons")

    # ------------------------------------------------------------------ records -> tensors

    def encode(self, position: int) -> dict[str, torch.Tensor]:
        """Tokenise sample `position` (no skipping); raises `BadSampleError` when it cannot be used."""
        prepared = self._prepared[position]
        index = self._source_index[position]
        text = self.processor.apply_chat_template(
            prepared.messages, tokenize=False, add_generation_prompt=False, system_prompt=self.system_prompt
        )
        try:
            encoded = self.processor(
                text=text,
                images=prepared.images or None,
                videos=[prepared.video] if prepared.video is not None else None,
                return_tensors="pt",
                padding=False,
                add_special_tokens=False,  # the template writes BOS itself
            )
        except (OSError, ValueError, TypeError) as err:
            raise BadSampleError(index, f"{type(err).__name__}: {err}", prepared.sample_id) from err
        input_ids = encoded["input_ids"][0].tolist()
        try:
            labels = build_labels(input_ids, self.tokens)
        except ValueError as err:
            raise BadSampleError(index, str(err), prepared.sample_id) from err
        input_ids, labels = self._fit_length(index, prepared.sample_id, input_ids, labels)
        if all(label == IGNORE_INDEX for label in labels):
            raise BadSampleError(index, "no supervised token", prepared.sample_id)
        item = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        for key in ("pixel_values", "image_sizes", "image_layouts", "image_num_crops"):
            if key in encoded:
                item[key] = encoded[key]
        return item

    def _fit_length(self, index: int, sample_id: Any, input_ids: list[int], labels: list[int]) -> tuple[list, list]:
        limit = self.max_length
        if limit is None or len(input_ids) <= limit:
            return input_ids, labels
        n_image = sum(1 for t in input_ids if t == self.tokens.image_token_id)
        too_long = f"{len(input_ids)} tokens (of which {n_image} image tokens) exceed max_length {limit}"
        if self.length_policy == "reject":
            raise BadSampleError(index, too_long, sample_id)
        turns = find_turns(input_ids, self.tokens)
        # Cut points: the start of a user turn that follows an assistant turn, with no image from there on.
        cut = None
        for k in range(len(turns) - 1, 0, -1):
            turn = turns[k]
            if turn.has_image:
                break
            if not turn.is_assistant and turns[k - 1].is_assistant and turn.start <= limit:
                cut = turn.start
                break
        if cut is None:
            raise BadSampleError(index, f"{too_long}, and no trailing text-only exchange can be dropped", sample_id)
        kept_turns = sum(1 for t in turns if t.start < cut)
        logger.warning(
            "sample %d: %s; dropped the last %d of %d turns (%d tokens kept)",
            index,
            too_long,
            len(turns) - kept_turns,
            len(turns),
            cut,
        )
        return input_ids[:cut], labels[:cut]

    def _prepare(self, index: int, record: Any) -> _Prepared:
        if not isinstance(record, Mapping):
            raise BadSampleError(index, f"a record must be a JSON object, got {type(record).__name__}")
        sample_id = record.get("id")

        def bad(reason: str) -> BadSampleError:
            return BadSampleError(index, reason, sample_id)

        conversations = record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise bad("'conversations' must be a non-empty list")
        messages = []
        for turn_no, turn in enumerate(conversations):
            if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
                raise bad(f"turn {turn_no} must be an object with a string 'value'")
            role = ROLE_ALIASES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise bad(
                    f"turn {turn_no} has unknown role {turn.get('from')!r}; expected one of {sorted(ROLE_ALIASES)}"
                )
            if role == "system" and turn_no != 0:
                raise bad(f"a system turn may only come first, found one at turn {turn_no}")
            messages.append({"role": role, "content": turn["value"]})
        if messages[-1]["role"] != "assistant":
            raise bad(
                f"the conversation must end with an assistant ('gpt') turn, it ends with {messages[-1]['role']!r}"
            )
        empty = [n for n, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:
            # The template trims the content: an empty answer would teach the model to end every turn at once.
            raise bad(f"assistant turn {empty[0]} has an empty answer")
        for message in messages:
            if VIDEO_TOKEN in message["content"] and "video" not in record:
                raise bad(f"{VIDEO_TOKEN} placeholder without a 'video'")

        images = record.get("image")
        video = record.get("video")
        if images is not None and video is not None:
            raise bad("a sample may have 'image' or 'video', not both")
        if video is not None:
            frames = self._video_frames(video, bad)
            n_placeholders = sum(m["content"].count(IMAGE_TOKEN) + m["content"].count(VIDEO_TOKEN) for m in messages)
            if n_placeholders != 1:
                raise bad(
                    f"a video sample needs exactly one {IMAGE_TOKEN} or {VIDEO_TOKEN} placeholder, found {n_placeholders}"
                )
            for message in messages:
                # LLaVA video data writes `<image>`; the processor expands a video's `<video>`.
                content = _move_single_image_first(message["content"].replace(VIDEO_TOKEN, IMAGE_TOKEN))
                message["content"] = content.replace(IMAGE_TOKEN, VIDEO_TOKEN)
            return _Prepared(messages, [], frames, sample_id)

        if images is None:
            image_list = []
        elif isinstance(images, str):
            image_list = [images]
        elif isinstance(images, list) and all(isinstance(p, str) for p in images):
            image_list = list(images)
        else:
            raise bad(f"'image' must be a path or a list of paths, got {images!r}")
        n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if n_placeholders != len(image_list):
            raise bad(f"{n_placeholders} {IMAGE_TOKEN} placeholders for {len(image_list)} images")
        for message in messages:
            message["content"] = _move_single_image_first(message["content"])
        paths = [str(self._resolve(p, self.image_folder, bad)) for p in image_list]
        if self.check_files:
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise bad(f"image file not found: {missing[0]}{more}")
        return _Prepared(messages, paths, None, sample_id)

    def _video_frames(self, video: Any, bad) -> list[str]:
        if isinstance(video, list) and video and all(isinstance(p, str) for p in video):
            frames = [str(self._resolve(p, self.video_folder, bad)) for p in video]
        elif isinstance(video, str):
            path = self._resolve(video, self.video_folder, bad)
            if path.suffix.lower() in VIDEO_FILE_SUFFIXES:
                raise bad(f"video files are not decoded here ({path.name}); extract the frames into a folder")
            if not path.is_dir():
                raise bad(f"video frame folder not found: {path}")
            frames = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)
            if not frames:
                raise bad(f"video frame folder {path} holds no image files")
        else:
            raise bad(f"'video' must be a frame folder or a list of frame files, got {video!r}")
        if self.check_files:
            missing = [p for p in frames if not os.path.isfile(p)]
            if missing:
                raise bad(f"video frame not found: {missing[0]}")
        return frames

    @staticmethod
    def _resolve(path: str, folder: Path | None, bad) -> Path:
        """`path` relative to `folder`; with a folder given, a path that leads outside it (`..` or an absolute path
        elsewhere) is a bad sample: a data file picks files only within the folder the user named. Symbolic links
        the user placed in the folder are followed (into them, never back out through `..`)."""
        if folder is None:
            return Path(path)
        root = Path(os.path.abspath(folder))
        resolved = Path(os.path.abspath(root / path))  # `..` removed lexically, links kept
        if resolved != root and root not in resolved.parents:
            raise bad(f"image path {path!r} lies outside the image/video folder {folder}")
        return resolved  # opened without `..`: a link in the folder cannot lead back out of it

    def _bad(self, err: BadSampleError) -> None:
        if self.on_bad_sample == "raise":
            raise err
        self.bad_samples[err.index] = err.reason
        logger.warning("skipping %s", err)


# ----------------------------------------------------------------------------------------------------------
# Collator


@dataclass
class LladaVDataCollator:
    r"""
    Pads `LladaVDataset` items (or any dicts with 1-D `input_ids`/`labels`) into a training batch.

    Returns `input_ids`, `labels`, `attention_mask` of shape `(batch, length)` and, when any sample has images,
    `pixel_values` (all crops concatenated in sample order), `image_sizes`, `image_layouts`, `image_num_crops`.

    Padding modes:
    - `"official"` (default, what the released model was trained with; docs/parity.md Q21): the
      official collator right-pads the *unexpanded* ids (each image placeholder one token) with EOS in both
      `input_ids` and `labels`, so every sample gets supervised EOS targets up to the longest sample; they count
      in the sample's loss normaliser and teach the model to fill the rest of a fixed-length canvas with EOS.
      Then the official merge pads the expanded sequences with zero embeddings and `-100` labels. We reproduce
      the first padding exactly (attention 1) and write the second as pad tokens with `-100` labels hidden by
      `attention_mask` (docs/parity.md Q27: the official model attended those zero vectors). Labels equal the official merged
      labels (tested against the golden batch).
    - `"masked"`: plain padding: pad tokens with `-100` labels, hidden by `attention_mask`. The loss then does
      not depend on what else is in the batch, but the model is no longer taught to emit EOS after its answer.

    Args:
        pad_token_id: the padding id (EOS, 126081 for LLaDA).
        image_token_id: the id images are expanded to (to count placeholders for the official padding).
        padding: `"official"` or `"masked"`.
        max_length: supervised EOS padding never grows a sample beyond this length (samples themselves are
            limited by the dataset); `None`: no cap.
        pad_to_multiple_of: round the batch length up (with masked padding).
        dummy_image: give every batch without images one zero crop (single-crop layout) whose image tokens sit
            in masked padding at the end of the first row: no query sees them and no label covers them, so the
            loss is unchanged, but the vision tower, projector and newline run (with zero gradients). Needed
            when a batch may hold no image: in stage 1 (only the projector trains) the loss of such a batch would
            otherwise have no gradient at all, and data parallel training (DDP without
            `find_unused_parameters`, DeepSpeed ZeRO-3) needs every rank to use the same modules in the same
            order (the official code encodes a zero image for text-only samples for the same reason, golden
            docs/parity.md Q22). `from_processor` turns it on.
        crop_size, dummy_image_tokens: size of the dummy crop and its number of image tokens (set by
            `from_processor` from the image processor).
    """

    pad_token_id: int
    image_token_id: int
    padding: str = "official"
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    dummy_image: bool = False
    crop_size: int | None = None
    dummy_image_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.dummy_image and not (self.crop_size and self.dummy_image_tokens):
            raise ValueError(
                f"dummy_image needs crop_size ({self.crop_size}) and dummy_image_tokens ({self.dummy_image_tokens}); "
                "build the collator with LladaVDataCollator.from_processor"
            )

    @classmethod
    def from_processor(cls, processor: Any, dummy_image: bool = True, **kwargs) -> LladaVDataCollator:
        """A collator with the processor's pad (EOS) and image token ids and its dummy-crop geometry.

        `dummy_image` defaults to True here: a batch without images then still has the vision side in its
        graph, which stage 1 (only the projector trains) and data parallel training need.
        """
        tokenizer = processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad_token nor an eos_token")
        image_processor = processor.image_processor
        kwargs.setdefault("crop_size", image_processor.crop_size)
        kwargs.setdefault("dummy_image_tokens", image_processor.get_num_image_tokens(LAYOUT_SINGLE))
        return cls(pad_token_id=pad, image_token_id=processor.image_token_id, dummy_image=dummy_image, **kwargs)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of samples")
        ids_list, label_list, eos_pads = [], [], []
        for i, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels = torch.as_tensor(feature["labels"], dtype=torch.long)
            if ids.dim() != 1 or ids.shape != labels.shape:
                raise ValueError(
                    f"sample {i}: input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must be 1-D and equal"
                )
            n_image_tokens = int((ids == self.image_token_id).sum())
            n_images = len(feature["image_layouts"]) if "image_layouts" in feature else 0
            if n_image_tokens and not n_images:
                raise ValueError(f"sample {i} has {n_image_tokens} image tokens but no image_layouts/pixel_values")
            ids_list.append(ids)
            label_list.append(labels)
            eos_pads.append(len(ids) - n_image_tokens + n_images)  # length with one token per placeholder
        if self.padding == "official":
            longest_text = max(eos_pads)
            eos_pads = [longest_text - n for n in eos_pads]
            if self.max_length is not None:
                eos_pads = [max(0, min(p, self.max_length - len(ids))) for p, ids in zip(eos_pads, ids_list)]
        else:
            eos_pads = [0] * len(features)
        length = max(len(ids) + p for ids, p in zip(ids_list, eos_pads))
        visual = [f for f in features if "pixel_values" in f]
        n_dummy = self.dummy_image_tokens if (self.dummy_image and not visual) else 0
        if n_dummy:
            length = max(length, len(ids_list[0]) + eos_pads[0] + n_dummy)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of

        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        for row, (ids, lab, pad) in enumerate(zip(ids_list, label_list, eos_pads)):
            n = len(ids)
            input_ids[row, :n] = ids
            labels[row, :n] = lab
            labels[row, n : n + pad] = self.pad_token_id  # supervised EOS padding (official mode only)
            attention_mask[row, : n + pad] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

        if n_dummy:
            # Masked padding (attention 0, label -100) at the end of row 0: the loss cannot see it.
            input_ids[0, length - n_dummy :] = self.image_token_id
            side = self.crop_size
            out["pixel_values"] = torch.zeros(1, 3, side, side)
            out["image_sizes"] = torch.tensor([[side, side]], dtype=torch.long)
            out["image_layouts"] = torch.tensor([LAYOUT_SINGLE], dtype=torch.long)
            out["image_num_crops"] = torch.tensor([1], dtype=torch.long)
        if visual:
            out["pixel_values"] = torch.cat([torch.as_tensor(f["pixel_values"]) for f in visual])
            for key in ("image_sizes", "image_layouts", "image_num_crops"):
                missing = [i for i, f in enumerate(features) if "pixel_values" in f and key not in f]
                if missing:
                    raise ValueError(f"samples {missing} have pixel_values but no {key}")
                out[key] = torch.cat([torch.as_tensor(f[key], dtype=torch.long) for f in visual])
        return out


class MaskCountSampling:
    """Wraps a collator: each sample masks `l ~ U{1..L}` of its `L` supervised tokens, a uniform subset.

    The batch gets `masked_indices` and `masking_t = l / L`, so `LladaVModel.forward` weighs each masked token by
    `1 / p_mask ~= L / l`. This is the second form of LLaDA's training/likelihood bound (Nie et al. 2025, "Large
    Language Diffusion Models", appendix B): with `t ~ U(0, 1)` the number of masked tokens is Binomial(L, t) and
    `integral of C(L, l) t^(l-1) (1-t)^(L-l) dt = 1 / l`, so both forms have the same expectation, sum over `l` of
    `1 / l` times the expected loss on a uniform `l`-subset. This one has lower variance: the weights are bounded
    by `L` instead of `1 / t`, and at least one token is always masked. It matters for short answers: with one
    or two supervised tokens a sample's default loss is zero most of the time and occasionally `1 / t` times
    larger, so a batch's gradient is dominated by its few samples with the smallest `t`.
    (`p_mask = (1 - eps) * t + eps` makes the weight `1 / ((1 - eps) l / L + eps)`, that is `L / l` divided by
    `1 - eps + eps L / l`, with `eps` the config's `diffusion_eps` (1e-3). That is within 1% of `L / l` while
    `eps L / l <= 0.01`, as for short answers. For long answers with few masked tokens the weight is smaller,
    capped at `1 / eps` like the default form's weights, and the two forms then differ by more than `eps`.)

    Args:
        collator: the collator to wrap (e.g. `LladaVDataCollator`); its batches need `labels`.
        seed: seed of this sampler's own generator (deterministic masks given the batches).
    """

    def __init__(self, collator, seed: int = 0):
        if not callable(collator):
            raise TypeError(f"collator must be callable, got {type(collator).__name__}")
        self.collator = collator
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        if "labels" not in batch:
            raise ValueError("MaskCountSampling needs batches with labels (the supervised tokens to mask)")
        supervised = batch["labels"] != IGNORE_INDEX
        masked = torch.zeros_like(supervised)
        masking_t = torch.zeros(supervised.shape[0])
        for row in range(supervised.shape[0]):
            positions = supervised[row].nonzero().flatten()
            total = len(positions)
            if total == 0:
                continue  # no loss from this row whatever t is
            count = int(torch.randint(1, total + 1, (), generator=self.generator))
            masked[row, positions[torch.randperm(total, generator=self.generator)[:count]]] = True
            masking_t[row] = count / total
        batch["masked_indices"] = masked
        batch["masking_t"] = masking_t
        return batch


__all__ = [
    "IGNORE_INDEX",
    "MASK_SAMPLING",
    "MaskCountSampling",
    "BadSampleError",
    "LladaVDataCollator",
    "LladaVDataset",
    "TemplateTokens",
    "Turn",
    "build_labels",
    "find_turns",
    "load_records",
]
