"""An independent, naive kphi-3 forward written from the specification, for checking the real model.

It reads a reference-format state dict (the key names of the report's checkpoints) and computes logits
with explicit loops and index lists: embedding, RMSNorm, rotary embedding, causal attention, SiLU-gated
MLP and grouped pointwise blocks. Nothing here imports kphi or transformers' modeling code.
"""

import math

import torch


def block(sd, prefix, x):
    """A projection: dense (``prefix.weight``), single-group block, or two grouped linears."""
    if f"{prefix}.weight" in sd:
        return x @ sd[f"{prefix}.weight"].T
    single = f"{prefix}.first_pointwise_conv.group_layers.0.weight"
    if single in sd:
        return x @ sd[single].T
    w1 = sd[f"{prefix}.first_pointwise_conv.weight"]
    w2 = sd[f"{prefix}.second_pointwise_conv.weight"]
    groups, step, _ = w1.shape
    idx = [b * groups + a for a in range(groups) for b in range(step)]
    xi = x[..., idx]
    return torch.cat(
        [x[..., g * step : (g + 1) * step] @ w1[g] + xi[..., g * step : (g + 1) * step] @ w2[g] for g in range(groups)],
        dim=-1,
    )


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, positions, theta):
    """Rotary embedding, rotate-half convention, on ``x: [heads, T, head_dim]``."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    half = dim // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference_logits(sd, cfg, ids):
    """Logits ``[T, vocab]`` for one sequence ``ids: [T]``; ``cfg`` is a dict of config.json fields."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    T = ids.shape[0]
    positions = torch.arange(T)
    h = sd["model.embed_tokens.weight"][ids]
    if any(k.startswith("model.embed_to_hidden.") for k in sd):
        h = block(sd, "model.embed_to_hidden", h)
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = rms_norm(h, sd[f"{p}.input_layernorm.weight"], eps)
        qkv = block(sd, f"{p}.self_attn.qkv_proj", x)
        q, k, v = qkv.split(hidden, dim=-1)
        q, k, v = (t.view(T, heads, head_dim).transpose(0, 1) for t in (q, k, v))
        q, k = rotate(q, positions, theta), rotate(k, positions, theta)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + mask, dim=-1)
        a = (att @ v).transpose(0, 1).reshape(T, hidden)
        h = h + block(sd, f"{p}.self_attn.o_proj", a)
        x = rms_norm(h, sd[f"{p}.post_attention_layernorm.weight"], eps)
        gate, up = block(sd, f"{p}.mlp.gate_up_proj", x).chunk(2, dim=-1)
        h = h + block(sd, f"{p}.mlp.down_proj", up * torch.nn.functional.silu(gate))
    h = rms_norm(h, sd["model.norm.weight"], eps)
    if any(k.startswith("hidden_to_embed.") for k in sd):
        h = block(sd, "hidden_to_embed", h)
    return h @ sd["lm_head.weight"].T


def reference_greedy(sd, cfg, ids, new_tokens):
    """Greedy continuation by repeated full forwards (no cache)."""
    out = ids.clone()
    for _ in range(new_tokens):
        nxt = reference_logits(sd, cfg, out)[-1].argmax()
        out = torch.cat([out, nxt[None]])
    return out
