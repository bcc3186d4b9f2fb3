"""Processor of LLaDA-V: chat template, `<image>` expansion and tokenisation, around `LladaVImageProcessor`.

Notable facts (docs/processor.md):
- the LLaDA-8B-Instruct chat template: BOS, then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content |
  trim}<|eot_id|>` per message, always ending with the assistant header; LLaDA-V's default system prompt;
- images go before the question, `<image>\\n{question}` (`<image> <image>\\n{question}` for several), keeping
  the `\\n` that the official inference dropped (docs/parity.md Q9: as in training);
- each `<image>` (and `<video>`, a video's placeholder) becomes exactly as many `<image>` tokens (id 126349,
  a special token after the released vocabulary) as the model packs features for, counted by
  `image_layout_llada_v.num_image_tokens`;
- one image in a prompt uses the anyres layout, several images the multi-image pad layout (730 tokens each);
- ` /think` or ` /no_think` can be appended to the last user turn (`enable_thinking=True/False`);
- left padding by default (generation); pass `padding_side="right"` for training batches;
- message text is text: `apply_chat_template` marks a message text that holds a string of the tokenizer's
  added tokens (`<|eot_id|>`, `<|start_header_id|>`, ...) with `LITERAL_OPEN`/`LITERAL_CLOSE`, and `__call__`
  tokenises a marked span as plain text, so a user cannot write template tokens (`<image>` and `<video>` stay
  placeholders: they are how text asks for images).
"""

import re
from typing import Any

# First of the transformers imports: an unsupported release stops here with one line (docs/errors.md).
from .compat_llada_v import TRANSFORMERS_RANGE  # noqa: F401  # isort: skip
from transformers.image_processing_base import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .image_layout_llada_v import LAYOUT_VIDEO, prompt_image_layout
from .image_processing_llada_v import LladaVImageProcessor, flatten_videos

# transformers 4.57 copies into its module cache only the files the loaded module imports itself (docs/usage.md):
from .image_resize_llada_v import resize_coefficients  # noqa: F401

logger = logging.get_logger(__name__)

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# Private-use characters around message text that must be tokenised as plain text (added-token strings in it are
# not tokens); inside a span these two characters are written with LITERAL_OPEN before them (docs/processor.md).
LITERAL_OPEN = "\ue000"
LITERAL_CLOSE = "\ue001"
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# The LLaDA-8B-Instruct template extended with LLaDA-V's default system prompt, image/video content items and
# reasoning tags. Variables: `system_prompt` (replaces the default; "" or none drops the system turn),
# `enable_thinking` (True appends " /think", False " /no_think" to the last user turn). The assistant header
# is always added (as in LLaDA's template) except after a final assistant message with
# `add_generation_prompt=False` (a complete conversation, e.g. for training).
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- set parts = namespace(visual='', text='') -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}"
    "{%- set parts.visual = parts.visual + (' ' if parts.visual else '') + '" + IMAGE_TOKEN + "' -%}"
    "{%- elif item['type'] == 'video' -%}"
    "{%- set parts.visual = parts.visual + (' ' if parts.visual else '') + '" + VIDEO_TOKEN + "' -%}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- set parts.text = parts.text + ('\\n' if parts.text else '') + item['text'] -%}"
    "{%- else -%}{{ raise_exception('unsupported content type: ' + item['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ parts.visual + ('\\n' if parts.visual and parts.text else '') + parts.text }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render_content(messages[0]['content']) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = system_prompt if system_prompt is defined else '" + DEFAULT_SYSTEM_PROMPT + "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- set state = namespace(last_user=-1) -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set state.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- if system -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set content = render_content(message['content']) | trim -%}"
    "{%- if loop.index0 == state.last_user and enable_thinking is defined and enable_thinking is not none -%}"
    "{%- set tag = ' /think' if enable_thinking else ' /no_think' -%}"
    "{%- if not content.endswith(tag) -%}{%- set content = content + tag -%}{%- endif -%}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt or not loop_messages or loop_messages[-1]['role'] != 'assistant' -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


def _is_nested(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, (list, tuple)) for v in value)


class LladaVProcessor(ProcessorMixin):
    r"""
    Wraps a `LladaVImageProcessor` and the LLaDA tokenizer (with `<image>` added) into one processor.

    Args:
        image_processor (`LladaVImageProcessor`): the crops and their layouts.
        tokenizer (`PreTrainedTokenizerFast`): the converted LLaDA tokenizer; `image_token` must be a single
            special token of it.
        chat_template (`str`, *optional*): defaults to `CHAT_TEMPLATE` (LLaDA's template, docs/processor.md).
        image_token (`str`, defaults to `"<image>"`): the image placeholder, also the token the model fills.
        video_token (`str`, defaults to `"<video>"`): a video's placeholder in text; it is expanded to image tokens
            too (the model receives one `<image>` span per video, as in training).
    """

    def __init__(
        self,
        image_processor: LladaVImageProcessor | None = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        video_token: str = VIDEO_TOKEN,
        **kwargs,
    ) -> None:
        if image_processor is None or tokenizer is None:
            raise ValueError("LladaVProcessor needs both an image_processor and a tokenizer")
        if image_token == video_token:
            raise ValueError(f"image_token and video_token must differ, both are {image_token!r}")
        self.image_token = image_token
        self.video_token = video_token
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if token_id is None or token_id == tokenizer.unk_token_id or ids != [token_id]:
            raise ValueError(
                f"the tokenizer has no single token for {image_token!r} (encodes to {ids}); build it with "
                "llada_v.conversion.tokenizer.build_converted_tokenizer"
            )
        self.image_token_id = token_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The image processor is this module's sibling class: build it from the nested entry of
        # processor_config.json instead of resolving it again through AutoImageProcessor, which would ask for
        # trust_remote_code a second time and could load a second copy of the class.
        image_config = (processor_dict or {}).get("image_processor")
        if image_config is None:
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        # Image settings given to from_pretrained override the saved ones (and must not reach the tokenizer).
        overrides = {key: kwargs.pop(key) for key in LladaVImageProcessor.valid_kwargs.__annotations__ if key in kwargs}
        image_processor = LladaVImageProcessor.from_dict({**image_config, **overrides})
        subfolder = kwargs.pop("subfolder", "")
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return [image_processor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str = "left",
        **kwargs,
    ) -> BatchFeature:
        """
        Tokenise prompts and preprocess their images and videos.

        Every `<image>` in `text` takes the next image, every `<video>` the next video (images/videos may be flat
        lists over the whole batch or per-prompt lists). A prompt with exactly one image uses the anyres layout;
        a prompt with several images uses the pad layout for each. Each placeholder is replaced by
        `num_image_tokens` copies of `<image>`.

        Args:
            images: images (see `LladaVImageProcessor.preprocess`), flat or per prompt.
            text (`str` or `list[str]`): prompts, e.g. from `apply_chat_template`.
            videos: videos (lists of frames or 4-D arrays), flat or per prompt.
            return_tensors (`str`, defaults to `"pt"`): passed to the tokenizer; image features are tensors.
            padding (defaults to `True`): tokenizer padding (to the longest prompt).
            padding_side (`str`, defaults to `"left"`): left for generation, right for training.
            kwargs: other tokenizer arguments (`truncation`, `max_length`, `add_special_tokens`, ...), also accepted
                as `text_kwargs={...}`; `images_kwargs`/`videos_kwargs` are accepted and ignored.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` and, with images or videos, `pixel_values`,
            `image_sizes`, `image_layouts`, `image_num_crops`.
        """
        kwargs = dict(kwargs)
        kwargs.update(kwargs.pop("text_kwargs", None) or {})
        for ignored in ("images_kwargs", "videos_kwargs", "audio_kwargs", "common_kwargs"):
            kwargs.pop(ignored, None)
        if images is None and text is None and videos is None:
            raise ValueError("LladaVProcessor needs `text`, `images` or `videos`")
        if text is None:
            return self.image_processor(images=images, videos=videos, return_tensors=return_tensors)
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if len(texts) == 0:
            raise ValueError("text is an empty list")

        visual_inputs, token_counts = self._preprocess_visuals(texts, images, videos)
        expanded, expected_per_sample = self._expand_placeholders(texts, token_counts)
        if any(LITERAL_OPEN in text for text in expanded):
            text_inputs = self._tokenize_with_literals(expanded, return_tensors, padding, padding_side, kwargs)
            texts = ["".join(part for part, _ in _literal_segments(text)) for text in texts]
        else:
            text_inputs = self.tokenizer(
                expanded, return_tensors=return_tensors, padding=padding, padding_side=padding_side, **kwargs
            )
        input_ids = text_inputs["input_ids"]
        rows = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
        got = [list(row).count(self.image_token_id) for row in rows]
        if got != expected_per_sample:
            raise ValueError(
                f"image tokens in input_ids per prompt {got} differ from the expected {expected_per_sample} "
                "(truncation? raise max_length or disable truncation)"
            )
        self._warn_unknown_words(texts, rows)
        return BatchFeature(data={**text_inputs, **visual_inputs})

    def _tokenize_with_literals(
        self, texts: list[str], return_tensors: str | None, padding: Any, padding_side: str, kwargs: dict
    ) -> Any:
        """Tokenise texts with marked spans (`mark_literal_text`): the spans as plain text (`split_special_tokens`),
        the rest as usual; then the tokenizer's own special tokens and padding."""
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k != "add_special_tokens")
        if unsupported:
            raise ValueError(f"tokenizer arguments {unsupported} are not supported with marked literal text")
        add_special = kwargs.get("add_special_tokens", True)
        prefix = self.tokenizer("", add_special_tokens=True)["input_ids"] if add_special else []
        rows = []
        for text in texts:
            ids = list(prefix)
            for part, literal in _literal_segments(text):
                if part:
                    encoded = self.tokenizer(part, add_special_tokens=False, split_special_tokens=literal)
                    ids.extend(encoded["input_ids"])
            rows.append(ids)
        return self.tokenizer.pad(
            {"input_ids": rows}, padding=padding, padding_side=padding_side, return_tensors=return_tensors
        )

    def mark_literal_text(self, text: str) -> str:
        """`text` marked to be tokenised as plain text when it holds a string of an added token of the tokenizer
        (`<image>`/`<video>` placeholders excepted) or a marker character; else `text` unchanged. The markers sit
        inside its leading and trailing white space, so the template's `trim` sees the same text."""
        if not isinstance(text, str):
            return text
        if not (LITERAL_OPEN in text or LITERAL_CLOSE in text or self._has_added_token(text)):
            return text
        core = text.strip()
        if not core:
            return text
        start = text.index(core)
        escaped = core.replace(LITERAL_OPEN, LITERAL_OPEN * 2).replace(LITERAL_CLOSE, LITERAL_OPEN + LITERAL_CLOSE)
        return f"{text[:start]}{LITERAL_OPEN}{escaped}{LITERAL_CLOSE}{text[start + len(core) :]}"

    def _has_added_token(self, text: str) -> bool:
        placeholders = (self.image_token, self.video_token)
        tokens = getattr(self.tokenizer, "added_tokens_decoder", {}).values()
        return any(str(token) not in placeholders and str(token) in text for token in tokens)

    def _mark_conversation(self, conversation: list) -> list:
        """A copy of `conversation` with every message text marked by `mark_literal_text`."""
        marked = []
        for message in conversation:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                message = {**message, "content": self.mark_literal_text(content)}
            elif isinstance(content, list):
                parts = [
                    {**part, "text": self.mark_literal_text(part["text"])}
                    if isinstance(part, dict) and part.get("type") == "text" and "text" in part
                    else part
                    for part in content
                ]
                message = {**message, "content": parts}
            marked.append(message)
        return marked

    def _warn_unknown_words(self, texts: list[str], rows: list) -> None:
        """Warn (once per set of words) when the tokenizer mapped words to its unknown token: a word-level
        tokenizer such as the demo's does so silently. The released byte-level tokenizer has no unknown token."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None or not any(unk in row for row in rows):
            return
        words = []
        for text in texts:
            if not getattr(self.tokenizer, "is_fast", False):
                break
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            words += [
                text[a:b] for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"]) if token == unk
            ]
        named = f": {', '.join(sorted(set(words)))}" if words else ""
        logger.warning_once(
            f"the prompt has words the tokenizer does not know, read as {self.tokenizer.unk_token}{named} "
            "(the model sees no meaning in them)"
        )

    def _placeholder_pattern(self) -> re.Pattern:
        return re.compile(f"{re.escape(self.image_token)}|{re.escape(self.video_token)}")

    def _preprocess_visuals(self, texts: list[str], images: Any, videos: Any) -> tuple[dict, list[int]]:
        """Crops of every image and video in placeholder order, and the token count of each placeholder."""
        placeholders = [[m.group(0) for m in self._placeholder_pattern().finditer(t)] for t in texts]
        image_counts = [p.count(self.image_token) for p in placeholders]
        video_counts = [p.count(self.video_token) for p in placeholders]
        image_iter = iter(self._flatten_visuals(images, image_counts, "image"))
        video_iter = iter(self._flatten_visuals(videos, video_counts, "video"))
        items = []
        for sample_placeholders, n_images in zip(placeholders, image_counts):
            image_layout = prompt_image_layout(n_images)
            for placeholder in sample_placeholders:
                if placeholder == self.image_token:
                    items.append((image_layout, next(image_iter)))
                else:
                    items.append((LAYOUT_VIDEO, next(video_iter)))
        if not items:
            return {}, []
        visual_inputs = dict(self.image_processor.preprocess_items(items, return_tensors="pt"))
        return visual_inputs, visual_inputs.pop("num_image_tokens")

    def _expand_placeholders(self, texts: list[str], token_counts: list[int]) -> tuple[list[str], list[int]]:
        """Each placeholder replaced by its count of `<image>` tokens; also the total count per prompt."""
        expanded, expected_per_sample, counts_iter = [], [], iter(token_counts)
        for sample in texts:
            total = 0

            def expand(match: re.Match) -> str:
                nonlocal total
                count = next(counts_iter)
                total += count
                return self.image_token * count

            expanded.append(self._placeholder_pattern().sub(expand, sample))
            expected_per_sample.append(total)
        return expanded, expected_per_sample

    def _flatten_visuals(self, visuals: Any, counts: list[int], kind: str) -> list:
        """Images or videos as one flat list in placeholder order, checked against the placeholder counts."""
        placeholder = self.image_token if kind == "image" else self.video_token
        if visuals is None:
            if sum(counts):
                raise ValueError(
                    f"the text has {sum(counts)} {placeholder} placeholders (per prompt: {counts}) "
                    f"but no {kind}s were given"
                )
            return []
        if kind == "image":
            per_prompt = _is_nested(visuals)
            if per_prompt:
                if len(visuals) != len(counts) or [len(v) for v in visuals] != counts:
                    raise ValueError(
                        f"images per prompt {[len(v) for v in visuals]} do not match the {placeholder} placeholders "
                        f"per prompt {counts}"
                    )
                flat = [image for prompt_images in visuals for image in prompt_images]
            else:
                flat = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        else:
            flat = flatten_videos(visuals)
        if len(flat) != sum(counts):
            raise ValueError(
                f"got {len(flat)} {kind}s but the text has {sum(counts)} {placeholder} placeholders "
                f"(per prompt: {counts})"
            )
        return flat

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """Render (and optionally tokenise) conversations with the LLaDA-V template.

        Besides the usual arguments of `ProcessorMixin.apply_chat_template`, the template reads
        `system_prompt` (replaces the default system prompt; `""` drops it) and `enable_thinking`
        (`True` appends ` /think`, `False` ` /no_think` to the last user turn).
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        if not conversation or any(not c for c in conversations):
            raise ValueError("apply_chat_template needs at least one message, got an empty conversation")
        # Message text is text: template-token strings in it are marked, and tokenised as plain text.
        marked = [self._mark_conversation(list(c)) for c in conversations]
        return super().apply_chat_template(marked if batched else marked[0], chat_template=chat_template, **kwargs)


def _literal_segments(text: str) -> list[tuple[str, bool]]:
    """`text` split into `(part, is_literal)`: marked spans (markers removed, escapes undone) and the rest."""
    segments, part, literal, index = [], [], False, 0
    while index < len(text):
        char = text[index]
        escaped = index + 1 < len(text) and text[index + 1] in (LITERAL_OPEN, LITERAL_CLOSE)
        if literal and char == LITERAL_OPEN and escaped:
            part.append(text[index + 1])
            index += 1
        elif char == (LITERAL_CLOSE if literal else LITERAL_OPEN):
            segments.append(("".join(part), literal))
            part, literal = [], not literal
        else:
            part.append(char)
        index += 1
    segments.append(("".join(part), literal))
    return segments


__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "IMAGE_TOKEN",
    "LITERAL_CLOSE",
    "LITERAL_OPEN",
    "VIDEO_TOKEN",
    "LladaVProcessor",
]
