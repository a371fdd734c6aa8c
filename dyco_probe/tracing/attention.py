"""The attention function that both traces and intervenes.

`attention_hooks(model, hook, layers)` swaps the attention of the model's **text decoder** (the vision
tower keeps its own) for a function registered with `transformers.AttentionInterface` under a private
name (plus the matching mask function in `AttentionMaskInterface`), and calls `hook(call)` once per
forward pass of every chosen layer with an `AttentionCall`.

Hook contract
-------------
`hook(call)` runs *before* the layer's attention is computed, with everything needed to decide:

- `call.layer_idx`; `call.query` `[B, H, Q, D]` (after RoPE), `call.key` / `call.value`
  `[B, H_kv, K, D]` (KV cache included, GQA not expanded); `call.mask` as transformers built it;
  `call.scaling`; `call.query_columns` `[Q]`: the sequence column of each query row (padding
  included, the same columns as `input_ids` / `generate`'s output). Keys are columns
  `key_offset..key_offset+K-1`; `key_offset` is 0 unless a sliding-window cache layer (Gemma 3's
  local layers) has dropped the columns its window can no longer see, and `call.num_columns`
  (`key_offset + K`) is the number of columns so far.
  Prefill: `Q = K = prompt length`, query rows = columns. Decode step: `Q = 1`, its column
  `num_columns - 1`. Image / text key columns of each sample come from `dyco_probe.spans`
  (`Spans.image_mask(call.num_columns)`...).
- It may call, any number of times:
  * `call.add_logit_bias(bias, rows=None)`: add `bias` (broadcastable to `[B, H, R, K]`, R = len(rows);
    a last dimension of `num_columns` is also accepted and cropped to the keys present)
    to the attention logits `q·kᵀ·scaling + mask` of query `rows` (indices into this call's Q rows,
    negative allowed, distinct; `None` = all rows) before the softmax. `-inf` (or the dtype minimum)
    knocks keys out and the rest renormalises; `log λ` turns a share `p` into `λp / (λp + 1 − p)`;
    zeros leave heads / keys untouched (a bias of 0 is a no-op, up to float rounding). Several biases
    add up. Per-head or per-sample biases: use the H or B dimension.
  * `call.request_probs(rows, callback)`: `callback(probs)` with `probs` `[B, H, R, num_columns]`
    float32 over every column so far, biases of this call included, padding keys and columns a
    sliding-window cache dropped exactly 0; called before the layer returns. A read-out: `probs`
    carries no gradient, also in a forward that does (a training step's).
  * `call.logits(rows)`: the unbiased logits `[B, H, R, K]` float32 (mask included), right away.
  * `call.edit_output(fn)`: replace the layer's attention output before `o_proj`, `[B, Q, H, D]`,
    by `fn(output)` (activation patching of heads; edits apply in order, after biases).
- Hooks run in registration order; sessions nest (an `attention_hooks` on an already patched model
  adds its hook to the running session, e.g. a tracer inside an intervention, which then sees the
  biased attention).

Cost: the layer output comes from the model's own implementation (sdpa by default), untouched, unless
a bias is added. Biased rows are recomputed explicitly (`q·Kᵀ` for those rows only, in chunks of 256
rows) and written over the output; a bias on every row (`rows=None`) computes the whole layer
explicitly, chunk by chunk. Requested probabilities cost one `q·Kᵀ` row each. No `L×L` matrix exists
unless a hook asks for all rows. Query rows that are pure padding (every key masked) may differ from
the base implementation's output when biased; they are never read by real tokens.

On exit the registration is removed and each config's `_attn_implementation` restored: the model
is as it was.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "AttentionCall",
    "AttentionHook",
    "attention_hooks",
    "attention_layers",
    "check_attention_layers",
    "explicit_attention_rows",
    "linear_attention_layers",
    "text_attention_modules",
]

AttentionHook = Callable[["AttentionCall"], None]

# Rows of queries computed per explicit chunk; bounds the [B, H, chunk, K] logits buffer.
_ROW_CHUNK = 256


@dataclass
class AttentionCall:
    """One call of a text attention layer, as seen by a hook.

    Attributes:
        layer_idx: decoder layer index.
        module: the attention module (`num_key_value_groups`, `head_dim`, `scaling` live here).
        query: `[B, H, Q, D]` queries after RoPE.
        key, value: `[B, H_kv, K, D]` keys and values, cache included (`K = past + Q`).
        mask: the mask transformers built for this call, unchanged: `None` (plain causal, no padding),
            a bool `[B|1, 1, Q, K]` (True = attend) or an additive float mask.
        scaling: logit scale (`head_dim ** -0.5`).
        key_offset: the column of key 0: 0, or the number of leading columns a sliding-window cache
            layer no longer holds.
        query_columns: `[Q]` long, the column (sequence position incl. padding) of each query:
            `key_offset + K - Q + arange(Q)` (a property).
    """

    layer_idx: int
    module: nn.Module
    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    scaling: float
    key_offset: int = 0
    _biases: list[tuple[Tensor | None, Tensor]] = field(default_factory=list)
    _requests: list[tuple[Tensor, Callable[[Tensor], None]]] = field(default_factory=list)
    _edits: list[Callable[[Tensor], Tensor]] = field(default_factory=list)

    @property
    def query_columns(self) -> Tensor:
        k, q = self.num_columns, self.query.shape[2]
        return torch.arange(k - q, k, device=self.query.device)

    @property
    def key_columns(self) -> Tensor:
        """`[K]` long: the column of each key."""
        return torch.arange(self.key_offset, self.num_columns, device=self.query.device)

    @property
    def num_columns(self) -> int:
        """Columns so far, `key_offset + K` (= K unless a sliding-window cache dropped some)."""
        return self.key_offset + self.key.shape[2]

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def num_queries(self) -> int:
        return self.query.shape[2]

    @property
    def num_keys(self) -> int:
        return self.key.shape[2]

    def _rows(self, rows) -> Tensor:
        q = self.num_queries
        if isinstance(rows, Tensor):  # trusted, no device sync: negatives wrap, nothing is checked
            rows = rows.to(device=self.query.device, dtype=torch.long).reshape(-1)
            return torch.where(rows < 0, rows + q, rows)
        rows = [int(r) + q if int(r) < 0 else int(r) for r in ([rows] if isinstance(rows, int) else rows)]
        if any(r < 0 or r >= q for r in rows):
            raise IndexError(f"query rows {rows} out of range for {q} queries")
        return torch.tensor(rows, dtype=torch.long, device=self.query.device)

    def add_logit_bias(self, bias: Tensor, rows: Sequence[int] | Tensor | None = None) -> None:
        """Add `bias` to the attention logits of this layer before the softmax.

        Args:
            bias: broadcastable to `[B, H, R, K]` (R = len(rows), or Q when `rows` is None). Use
                `-inf` (or the dtype minimum) to knock keys out, `log λ` to scale their weight by λ,
                zeros for heads / keys to leave alone.
            rows: query rows (indices into this call's `Q` queries, negative allowed); `None`: all
                rows, which makes this layer compute attention eagerly.
        """
        if rows is not None:
            rows = self._rows(rows)
            if torch.unique(rows).numel() != rows.numel():
                raise ValueError("add_logit_bias: rows must be distinct")
        if self.key_offset and bias.ndim and bias.shape[-1] == self.num_columns:
            bias = bias[..., self.key_offset :]  # given over every column: keep the keys present
        self._biases.append((rows, bias))

    def request_probs(self, rows: Sequence[int] | Tensor, callback: Callable[[Tensor], None]) -> None:
        """Ask for the attention probabilities of query `rows`: `callback(probs)` with `probs`
        `[B, H, len(rows), K]` float32, biases of this call included, padding keys at exactly 0."""
        self._requests.append((self._rows(rows), callback))

    def logits(self, rows: Sequence[int] | Tensor) -> Tensor:
        """Unbiased attention logits `q·kᵀ·scaling + mask` of query `rows`: `[B, H, R, K]` float32."""
        rows = self._rows(rows)
        q, k = self.query[:, :, rows].to(torch.float32), self.key.to(torch.float32)
        b, h, r, d = q.shape
        logits = torch.matmul(q.reshape(b, k.shape[1], -1, d), k.transpose(-1, -2)).reshape(b, h, r, -1)
        return logits * self.scaling + self.logit_mask(rows)

    def edit_output(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Replace this layer's attention output (before `o_proj`), `[B, Q, H, D]`, by `fn(output)`."""
        self._edits.append(fn)

    def logit_mask(self, rows: Tensor) -> Tensor:
        """The additive float32 mask of query `rows`, `[B|1, 1, R, K]`: 0 where visible, dtype-min elsewhere."""
        if self.mask is None and self.num_queries == 1:  # a decode step without padding sees every key
            return torch.zeros((), dtype=torch.float32, device=self.query.device)
        return _mask_rows(self.mask, rows, self.query_columns, self.key_columns, self.query.device)

    def _padded(self, probs: Tensor) -> Tensor:
        """`[..., K]` -> `[..., num_columns]`, zeros in front for columns the cache dropped."""
        if not self.key_offset:
            return probs
        return torch.nn.functional.pad(probs, (self.key_offset, 0))


def _mask_rows(
    mask: Tensor | None, rows: Tensor, query_columns: Tensor, key_columns: Tensor, device
) -> Tensor:
    neg = torch.finfo(torch.float32).min
    num_keys = key_columns.shape[0]
    cols = key_columns.to(device)
    causal = cols[None, :] <= query_columns[rows][:, None]  # [R, K]
    if mask is None:
        visible = causal[None, None]
    elif mask.ndim == 2:  # flash-style 2-D padding mask
        visible = causal[None, None] & mask[:, None, None, -num_keys:].to(torch.bool)
    elif mask.dtype == torch.bool:
        visible = mask[:, :, rows, :num_keys]
    else:
        additive = mask[:, :, rows, :num_keys].to(torch.float32)
        return additive.clamp_min(neg)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return torch.where(visible, zero, torch.full((), neg, device=device))


def explicit_attention_rows(
    query: Tensor,
    key: Tensor,
    scaling: float,
    logit_mask: Tensor,
    bias: Tensor | None = None,
) -> Tensor:
    """Softmax attention probabilities of a few query rows, float32, GQA-aware.

    Args:
        query: `[B, H, R, D]`; key: `[B, H_kv, K, D]` with `H % H_kv == 0` (query head `h` reads
            key head `h // (H / H_kv)`, as `repeat_kv` lays them out).
        logit_mask: additive, broadcastable to `[B, H, R, K]`.
        bias: optional additive bias, broadcastable to `[B, H, R, K]`.

    Returns:
        `[B, H, R, K]` probabilities.
    """
    b, h, r, d = query.shape
    h_kv = key.shape[1]
    groups = h // h_kv
    with _float32(query):
        q = query.to(torch.float32).reshape(b, h_kv, groups * r, d)
        logits = torch.matmul(q, key.to(torch.float32).transpose(-1, -2)).reshape(b, h, r, -1)
        logits = logits * scaling + logit_mask
        if bias is not None:  # -inf biases on top of a dtype-min mask: keep every logit finite
            logits = (logits + bias.to(torch.float32)).clamp_min(torch.finfo(torch.float32).min)
        return torch.softmax(logits, dim=-1)


def _float32(like: Tensor):
    """A block where autocast (a mixed-precision training forward) leaves float32 math alone."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _apply_values(probs: Tensor, value: Tensor) -> Tensor:
    """`probs @ V` with GQA: `[B, H, R, K] x [B, H_kv, K, D] -> [B, H, R, D]` (float32)."""
    b, h, r, k = probs.shape
    h_kv = value.shape[1]
    out = torch.matmul(probs.reshape(b, h_kv, (h // h_kv) * r, k), value.to(torch.float32))
    return out.reshape(b, h, r, -1)


def _bias_block(biases: list[tuple[Tensor | None, Tensor]], rows: Tensor) -> Tensor:
    """Sum the biases that touch query `rows` into one block broadcastable to `[B, H, R, K]`."""
    block = torch.zeros((), dtype=torch.float32, device=rows.device)
    for brows, bias in biases:
        bias = bias.to(device=rows.device, dtype=torch.float32)
        if bias.ndim < 2:
            bias = bias.reshape(1, -1)
        if brows is None:
            part = bias if bias.shape[-2] == 1 else bias[..., rows, :]
        else:
            match = rows[:, None] == brows[None, :]  # [R, R_b]; brows are unique
            hit = match.any(-1)
            expanded = bias.expand(*bias.shape[:-2], len(brows), bias.shape[-1])
            part = expanded[..., match.to(torch.float32).argmax(-1), :]
            part = torch.where(hit[:, None], part, torch.zeros((), device=rows.device))
        block = block + part
    return block


class _Session:
    """One patched text decoder: the registered name, the hooks, and how to undo it."""

    _counter = itertools.count()

    def __init__(self, decoder: nn.Module):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.decoder = decoder
        self.modules = text_attention_modules(decoder)
        configs = {id(m.config): m.config for m in self.modules}
        configs[id(decoder.config)] = decoder.config
        self.configs = list(configs.values())
        originals = {c._attn_implementation for c in self.configs}
        if len(originals) != 1:
            raise RuntimeError(f"text attention layers disagree on the attention implementation: {originals}")
        self.original = originals.pop() or "eager"
        if self.original.startswith("dyco_probe"):
            raise RuntimeError("this model is already patched by another dyco_probe session")
        from transformers.models.llama.modeling_llama import eager_attention_forward

        self.base = ALL_ATTENTION_FUNCTIONS.get_interface(self.original, eager_attention_forward)
        base_mask = (
            ALL_MASK_ATTENTION_FUNCTIONS[self.original]
            if self.original in ALL_MASK_ATTENTION_FUNCTIONS
            else None
        )
        self.name = f"dyco_probe_{next(self._counter)}"
        self.hooks: list[tuple[frozenset | None, AttentionHook]] = []
        session = weakref.ref(self)

        def attention_forward(module, query, key, value, attention_mask, **kwargs):
            s = session()
            return s.forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.name, attention_forward)
        if base_mask is not None:
            AttentionMaskInterface.register(self.name, base_mask)
        self._registries = (AttentionInterface, AttentionMaskInterface)
        self._saved = [(c, c.__dict__.get("_attn_implementation_internal")) for c in self.configs]
        for c in self.configs:
            c._attn_implementation_internal = self.name
        # Columns seen by the decoder's current forward (cache + new), for sliding-window caches
        # that hand the attention fewer keys than columns.
        self.columns: int | None = None
        self._pre_hook = decoder.register_forward_pre_hook(_columns_hook(session), with_kwargs=True)

    def close(self) -> None:
        self._pre_hook.remove()
        for c, value in self._saved:
            c._attn_implementation_internal = value
        for registry in self._registries:
            registry._global_mapping.pop(self.name, None)

    def hooks_for(self, layer_idx: int) -> list[AttentionHook]:
        return [h for layers, h in self.hooks if layers is None or layer_idx in layers]

    def forward(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        hooks = self.hooks_for(module.layer_idx)
        if not hooks:
            return self.base(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        scaling = module.scaling if scaling is None else scaling
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("attention logit soft-capping is not supported by the dyco_probe hooks")
        offset = 0
        if self.columns is not None and self.columns > key.shape[2]:
            offset = self.columns - key.shape[2]
        call = AttentionCall(
            layer_idx=module.layer_idx,
            module=module,
            query=query,
            key=key,
            value=value,
            mask=attention_mask,
            scaling=scaling,
            key_offset=offset,
        )
        for hook in hooks:
            hook(call)
        if not call._biases:
            # The output is the base implementation's, untouched; requested rows are extra.
            out, weights = self.base(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
            # read-outs: float32 under autocast too, never differentiated (no graph kept alive)
            with torch.no_grad(), _float32(query):
                for rows, callback in call._requests:
                    callback(call._padded(_probs_in_chunks(call, rows, None)))
        else:
            out, weights = _biased_forward(self.base, call, module, attention_mask, dropout, kwargs)
        for fn in call._edits:
            out = fn(out)
        return out, weights


def _probs_in_chunks(call: AttentionCall, rows: Tensor, biases) -> Tensor:
    """Probabilities of query `rows`, computed `_ROW_CHUNK` rows at a time: `[B, H, R, K]`."""
    parts = []
    for start in range(0, len(rows), _ROW_CHUNK):
        chunk = rows[start : start + _ROW_CHUNK]
        bias = _bias_block(biases, chunk) if biases else None
        parts.append(
            explicit_attention_rows(
                call.query[:, :, chunk], call.key, call.scaling, call.logit_mask(chunk), bias
            )
        )
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _biased_forward(base, call: AttentionCall, module, attention_mask, dropout, kwargs):
    """Layer output with logit biases: biased rows recomputed explicitly, the rest from `base`."""
    query, key, value = call.query, call.key, call.value
    q_len = query.shape[2]
    if any(rows is None for rows, _ in call._biases):
        # A bias on every query row: the whole layer is computed eagerly (in row chunks).
        biased = torch.arange(q_len, device=query.device)
        shape = (query.shape[0], q_len, query.shape[1], value.shape[-1])
        out, weights = torch.empty(shape, dtype=query.dtype, device=query.device), None
    else:
        out, weights = base(
            module, query, key, value, attention_mask, scaling=call.scaling, dropout=dropout, **kwargs
        )
        out = out.clone()
        weights = None if weights is None else weights.clone()
        biased = torch.unique(torch.cat([rows for rows, _ in call._biases]))
    kept: dict[int, Tensor] = {}
    wanted = set(torch.cat([rows for rows, _ in call._requests]).tolist()) if call._requests else set()
    for start in range(0, len(biased), _ROW_CHUNK):
        chunk = biased[start : start + _ROW_CHUNK]
        probs = _probs_in_chunks(call, chunk, call._biases)
        out[:, chunk] = _apply_values(probs, value).to(out.dtype).transpose(1, 2)
        if weights is not None:
            weights[:, :, chunk] = probs.to(weights.dtype)
        for j, row in enumerate(chunk.tolist()):
            if row in wanted:
                kept[row] = probs[:, :, j]
    for rows, callback in call._requests:
        missing = [r for r in rows.tolist() if r not in kept]
        if missing:  # requested rows without a bias: softmax of the plain logits
            extra = _probs_in_chunks(call, torch.tensor(missing, device=query.device), call._biases)
            kept.update({r: extra[:, :, j] for j, r in enumerate(missing)})
        with torch.no_grad(), _float32(query):
            callback(call._padded(torch.stack([kept[r] for r in rows.tolist()], dim=2).detach()))
    return out, weights


def _columns_hook(session):
    """A decoder forward pre-hook recording the columns of the forward: cached + new."""

    def hook(module, args, kwargs):
        s = session()
        if s is None:
            return
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        new = embeds.shape[1] if embeds is not None else (ids.shape[1] if ids is not None else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        s.columns = None if new is None else int(past) + int(new)

    return hook


_SESSIONS: weakref.WeakKeyDictionary[nn.Module, _Session] = weakref.WeakKeyDictionary()


def _text_decoder(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not hasattr(decoder, "layers"):
        raise TypeError(f"cannot find the text decoder layers of {type(model).__name__}")
    return decoder


def text_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The softmax self-attention module of every text decoder layer that has one, in layer order.

    Layers whose token mixer is linear attention (Qwen3.5's Gated DeltaNet: a `linear_attn` module)
    have no attention row and are left out; their indices are `linear_attention_layers(model)`.
    """
    decoder = _text_decoder(model)
    modules = []
    for layer in decoder.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None and getattr(layer, "linear_attn", None) is not None:
            continue
        if attn is None or not hasattr(attn, "layer_idx"):
            raise TypeError(f"decoder layer {type(layer).__name__} has no self_attn with a layer_idx")
        modules.append(attn)
    return modules


def attention_layers(model: nn.Module) -> tuple[int, ...]:
    """Indices of the text decoder layers with softmax attention (all of them but in hybrid models)."""
    return tuple(int(m.layer_idx) for m in text_attention_modules(model))


def linear_attention_layers(model: nn.Module) -> tuple[int, ...]:
    """Indices of the text decoder layers whose token mixer is linear attention (no attention row)."""
    decoder = _text_decoder(model)
    return tuple(i for i, layer in enumerate(decoder.layers) if getattr(layer, "self_attn", None) is None)


def check_attention_layers(model: nn.Module, layers: Iterable[int]) -> None:
    """Raise a `ValueError` naming the `layers` that have no softmax attention to trace or bias."""
    linear = set(linear_attention_layers(model))
    bad = sorted(int(i) for i in layers if int(i) in linear)
    if bad:
        decoder = _text_decoder(model)
        mixer = type(getattr(decoder.layers[bad[0]], "linear_attn", decoder.layers[bad[0]])).__name__
        raise ValueError(
            f"layer(s) {bad} of {type(model).__name__} use linear attention ({mixer}): they have no "
            f"attention row to trace or bias; its softmax-attention layers are {list(attention_layers(model))}"
        )


@contextlib.contextmanager
def attention_hooks(
    model: nn.Module, hook: AttentionHook, layers: Iterable[int] | None = None
) -> Iterator[None]:
    """Run `hook(call)` at the text decoder's attention `layers` (None: all) while the block runs.

    The model's behaviour is unchanged unless the hook adds a logit bias; on exit every trace of
    the patch is gone (`config._attn_implementation` restored, registry entries removed). Asking for
    a linear-attention layer of a hybrid model (Qwen3.5) raises a `ValueError`; None means every
    softmax-attention layer.
    """
    if layers is not None:
        layers = [int(i) for i in layers]
        check_attention_layers(model, layers)
    decoder = _text_decoder(model)
    session = _SESSIONS.get(decoder)
    created = session is None
    if created:
        session = _Session(decoder)
        _SESSIONS[decoder] = session
    entry = (None if layers is None else frozenset(int(i) for i in layers), hook)
    session.hooks.append(entry)
    try:
        yield
    finally:
        session.hooks.remove(entry)
        if created:
            session.close()
            del _SESSIONS[decoder]
