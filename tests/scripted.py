"""A scripted mock model for sampler tests: logits are a fixed function of the column, so every decision of
`diffusion_generate` is predictable without weights."""

from types import SimpleNamespace

import torch
from torch import nn

from llada_v import LladaVGenerationConfig
from llada_v.generation_utils import LladaVGenerationMixin


class ScriptedModel(LladaVGenerationMixin, nn.Module):
    """Answer column `c` predicts `targets[c]` with logit `scores[c]` (all other logits 0). With a vocabulary of
    40 its probability is `e^s / (e^s + 39)`, so which predictions pass a threshold is known exactly.

    One script for every row (`targets`, `scores`), or one per row chosen by the row's last prompt token
    (`scripts={token: (targets, scores)}`). Embeddings are one-hot, so the model reads ids back from them.
    Every forward is recorded in `calls` (rows, positions, attention mask).
    """

    def __init__(self, targets=None, scores=None, scripts=None, vocab=40, mask_id=37, prompt_len=4):
        super().__init__()
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(max_position_embeddings=512))
        self.embed = nn.Embedding(vocab, vocab)
        self.embed.weight.data = torch.eye(vocab)
        self.vocab, self.prompt_len = vocab, prompt_len
        self.default = None if targets is None else (targets, scores)
        self.scripts = scripts or {}
        self.generation_config = LladaVGenerationConfig(
            mask_token_id=mask_id,
            pad_token_id=0,
            eos_token_id=vocab - 1,
            suppress_tokens=[1],
            tokenizer_vocab_size=38,
            stop_token_ids=None,
        )
        self.calls = []

    def get_input_embeddings(self):
        return self.embed

    def embed_multimodal(self, input_ids, *args):
        return self.embed(input_ids)

    def forward(self, inputs_embeds, attention_mask=None, logits_to_keep=None):
        ids = inputs_embeds.argmax(-1)  # (b, T)
        self.calls.append(SimpleNamespace(rows=ids.shape[0], positions=logits_to_keep.tolist(), mask=attention_mask))
        logits = torch.zeros(ids.shape[0], len(logits_to_keep), self.vocab)
        for r in range(ids.shape[0]):
            targets, scores = self.scripts.get(int(ids[r, self.prompt_len - 1]), self.default)
            for k, col in enumerate(logits_to_keep.tolist()):
                logits[r, k, targets[col - self.prompt_len]] = scores[col - self.prompt_len]
        return SimpleNamespace(logits=logits)
