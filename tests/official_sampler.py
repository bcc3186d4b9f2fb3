"""The official sampler as a parity oracle: `reference_generate` is written from the official
`generate_with_embeds` (docs/generation.md): full-sequence logits at every step, mask detection by embedding
comparison (docs/parity.md Q12), suppression over the whole `(1, L, V)` logits and a float64 softmax over all of
them. Batch size 1, as the official loop. The sampler tests compare `diffusion_generate` with it; the benchmark
times it as the baseline.
"""

import numpy as np
import torch
import torch.nn.functional as F

OFFICIAL_SUPPRESSED = (126081, 126080, 126346, 126347)  # docs/parity.md Q13


def _official_transfer_counts(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    counts = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        counts[i, : remainder[i]] += 1
    return counts


@torch.no_grad()
def reference_generate(
    model,
    inputs_embeds: torch.Tensor,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    stop_token_ids: list[list[int]] | None = None,
    suffix_token_ids: list[int] | None = None,
    suppressed_ids: tuple[int, ...] = OFFICIAL_SUPPRESSED,
    vocab_limit: int | None = None,
) -> tuple[list[int], int]:
    """The official `generate_with_embeds` on merged prompt embeddings `(1, P, D)`.

    `vocab_limit` emulates the official loader's lm_head shrunk to the tokenizer length (logits sliced to it).
    Returns (the official return value as a list of ids, number of forward passes).
    """
    embed = model.get_input_embeddings()
    device = inputs_embeds.device
    prompt_len = inputs_embeds.shape[1]
    suffix = list(suffix_token_ids or [])
    suffix_len = len(suffix)
    total = prompt_len + gen_length + suffix_len
    masked_embed = embed(torch.tensor([mask_id], device=device))  # (1, D)
    x_embeds = masked_embed.repeat(1, total, 1)
    x_embeds[:, :prompt_len] = inputs_embeds.clone()
    x = torch.full((1, total), mask_id, dtype=torch.long, device=device)
    if suffix_len:
        suffix_t = torch.tensor([suffix], dtype=torch.long, device=device)
        x_embeds[:, -suffix_len:] = embed(suffix_t)
        x[:, -suffix_len:] = suffix_t
    prompt_index = torch.zeros((1, total), dtype=torch.bool, device=device)
    prompt_index[:, :prompt_len] = True

    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    stop_position, found_stop = prompt_len + gen_length, False
    forward_passes = 0
    for num_block in range(num_blocks):
        block_start = prompt_len + num_block * block_length
        block_end = block_start + block_length
        if found_stop and stop_position <= block_start:
            break
        block_mask_index = torch.all(torch.abs(x_embeds[:, block_start:block_end] - masked_embed) < 1e-5, dim=2)
        num_transfer_tokens = _official_transfer_counts(block_mask_index, steps)
        for i in range(steps):
            mask_index = torch.all(torch.abs(x_embeds - masked_embed) < 1e-5, dim=2)  # (1, L)
            if found_stop and not mask_index[0, prompt_len:stop_position].any():
                break
            if not mask_index[0, block_start:block_end].any():
                break
            if cfg_scale > 0.0:
                un_embeds = x_embeds.clone()
                un_mask = prompt_index.unsqueeze(-1).expand_as(x_embeds)
                un_embeds[un_mask] = masked_embed.repeat(1, total, 1)[un_mask]
                logits = model(inputs_embeds=torch.cat([x_embeds, un_embeds], dim=0)).logits.float()
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(inputs_embeds=x_embeds).logits.float()  # (1, L, V): every position
            forward_passes += 1
            if vocab_limit is not None:
                logits = logits[..., :vocab_limit]
            for token_id in suppressed_ids:
                logits[:, :, token_id] = torch.where(mask_index, -float("inf"), logits[:, :, token_id])

            if temperature == 0:
                x0 = torch.argmax(logits, dim=-1)
            else:
                noisy = logits.to(torch.float64)
                gumbel = (-torch.log(torch.rand_like(noisy, dtype=torch.float64))) ** temperature
                x0 = torch.argmax(noisy.exp() / gumbel, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)  # (1, L, V) float64: the official cost
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
                del p
            else:
                x0_p = torch.rand(x0.shape, device=device)
            if found_stop:
                x0_p[:, stop_position:] = -np.inf
            else:
                x0_p[:, block_end:] = -np.inf
            if suffix_len:
                x0_p[:, -suffix_len:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            _, select_index = torch.topk(confidence[0], k=int(num_transfer_tokens[0, i]))
            transfer_index[0, select_index] = True
            x0_embeds = torch.where(mask_index.unsqueeze(-1), embed(x0), x_embeds)
            x_embeds[transfer_index] = x0_embeds[transfer_index]
            x[transfer_index] = x0[transfer_index]

            if stop_token_ids:
                generated = x[0, prompt_len : prompt_len + gen_length]
                for stop_seq in stop_token_ids:
                    for start in range(generated.size(0) - len(stop_seq) + 1):
                        if torch.all(generated[start : start + len(stop_seq)] == torch.tensor(stop_seq, device=device)):
                            position = prompt_len + start
                            if not found_stop or position < stop_position:
                                stop_position, found_stop = position, True
                            break
                    if found_stop:
                        break
    end = stop_position if found_stop else prompt_len + gen_length
    answer = x[0, prompt_len:end].tolist()
    return answer + (x[0, -suffix_len:].tolist() if suffix_len else []), forward_passes
