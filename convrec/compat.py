"""Load the authors' published ConvRec (github ismll-research/ConvRec, ``models/convrec.py``)
into ``ConvRec(faithful=True)``: same weights in, same user vectors and scores out.

``OFFICIAL_NAMES`` is the name map, written out; ``from_official`` applies it and checks every
tensor's shape, so a wrong map fails on its first tensor instead of giving other scores. The
authors' model also holds tensors its forward never reads (``IGNORED``): a user embedding, a
context layer and a time layer, the per-level output norms, the second feature projection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from convrec.item_encoder import ItemAttributes
from convrec.model import ConvRec
from convrec.time_context import paper_date_features

__all__ = ["IGNORED", "OFFICIAL_NAMES", "date_features", "from_official"]

# authors' name -> this package's name (item encoder and input block)
OFFICIAL_NAMES = {
    "item_encoder.token_embedding.weight": "item_encoder.item_embedding.weight",
    "item_encoder.features_encoder.weight": "item_encoder.attr_proj.weight",  # transposed
    "item_encoder.features_encoder.bias": "item_encoder.feature_bias",
    "item_encoder.cxt_encoder.weight": "item_encoder.context_encoder.weight",
    "item_encoder.cxt_encoder.bias": "item_encoder.context_encoder.bias",
    "item_encoder.ac_encoder.weight": "item_encoder.fusion.weight",
    "item_encoder.ac_encoder.bias": "item_encoder.fusion.bias",
    "item_encoder.item_encoder.weight": "item_encoder.item_proj.weight",
    "item_encoder.item_encoder.bias": "item_encoder.item_proj.bias",
    "item_layernorm.alpha": "item_encoder.norm.weight",
    "item_layernorm.beta": "item_encoder.norm.bias",
    "in_lin.weight": "item_encoder.in_proj.weight",
    "in_lin.bias": "item_encoder.in_proj.bias",
}
_STACK = "stacked_multihead_conv."
# per level l: authors' name -> this package's name; the per-head convs ({h}) are concatenated
# along the output channels into one grouped conv
LEVEL_NAMES = {
    "conv_layers.{l}.convs.{h}.weight": "encoder.stack.{l}.conv.weight",
    "conv_layers.{l}.convs.{h}.bias": "encoder.stack.{l}.conv.bias",
    "conv_layers.{l}.out_linear.weight": "encoder.stack.{l}.linear.weight",
    "conv_layers.{l}.out_linear.bias": "encoder.stack.{l}.linear.bias",
    "Res_weights1.{l}": "encoder.stack.{l}.alpha",
    "Res_weights2.{l}": "encoder.stack.{l}.beta",
    "layer_norms.{l}.alpha": "encoder.stack.{l}.norm.weight",
    "layer_norms.{l}.beta": "encoder.stack.{l}.norm.bias",
}
# held by the authors' model, never read by its forward (prefixes)
IGNORED = (
    "item_encoder.ifeature_cache.",  # the multi-hot attribute matrix: checked, not loaded
    "item_encoder.user_embedding.",
    "item_encoder.features_encoder_out.",
    "cxt_layer.",
    "time_linear.",
    _STACK + "layer_norms_out.",
)


def date_features(timestamps: Tensor) -> Tensor:
    """The authors' six date features of unix-second timestamps (any shape) -> (*, 6) float64:
    ``[(year - 2002) / 12, month / 12, day / 31, weekday / 7, day_of_year / 365, iso_week / 4]``.

    The three time-difference channels the input block adds are computed inside the model
    from these (``FaithfulItemEncoder.time_differences``), since they depend on the history.
    """
    return paper_date_features(timestamps)


def from_official(
    state_dict: Mapping[str, Tensor],
    item_attributes: ItemAttributes,
    *,
    max_len: int,
    levels: Sequence[Sequence[int]],
    heads: int,
    use_time: bool,
    leak_target_date: bool = False,
) -> ConvRec:
    """An eval-mode ``ConvRec(faithful=True)`` holding the authors' weights.

    ``state_dict`` of the authors' ``ConvRec`` (``sequence_len=max_len``,
    ``conv_params=levels``, ``num_conv_heads=heads``, ``num_known_item=None``); its dtype
    becomes the model's. ``item_attributes``: the attribute ids of every item (row 0 =
    padding), the ones its multi-hot ``ifeatures`` were built from (checked when the
    state_dict holds them). ``use_time``: feed the date contexts (else every context is zero,
    the authors' model fed no dates); ``leak_target_date``: their candidate protocol. Raises
    ``ValueError`` naming the first missing, unexpected or mismatching tensor.
    """
    state = dict(state_dict)
    for name in ("item_encoder.token_embedding.weight", "item_encoder.features_encoder.weight"):
        if name not in state:
            raise ValueError(f"official state_dict lacks {name!r}")
    num_items = state["item_encoder.token_embedding.weight"].shape[0] - 1
    d_model = state["item_encoder.token_embedding.weight"].shape[1]
    num_attributes = state["item_encoder.features_encoder.weight"].shape[1]
    dtype = state["item_encoder.token_embedding.weight"].dtype
    model = ConvRec(
        num_items,
        d_model,
        levels,
        heads,
        item_attributes=item_attributes,
        num_attributes=num_attributes,
        use_time=use_time,
        faithful=True,
        max_len=max_len,
        leak_target_date=leak_target_date,
        backend="reference",
    ).to(dtype)
    target = {**model.state_dict(), **model.encoder.level_state("encoder.")}
    target.pop("encoder.stack_weights")  # loaded as its per-level tensors
    loaded: dict[str, Tensor] = {}
    for theirs, ours in OFFICIAL_NAMES.items():
        value = _take(state, theirs)
        if theirs == "item_encoder.features_encoder.weight":
            value = value.T
        loaded[ours] = _checked(theirs, ours, value, target)
    for level in range(len(model.encoder.levels)):
        for theirs, ours in LEVEL_NAMES.items():
            theirs, ours = _STACK + theirs.replace("{l}", str(level)), ours.format(l=level)
            if "{h}" in theirs:
                heads_of = [_take(state, theirs.replace("{h}", str(h))) for h in range(heads)]
                value = torch.cat(heads_of, dim=0)
                theirs = theirs.replace("{h}", "0..." + str(heads - 1))
            else:
                value = _take(state, theirs)
            loaded[ours] = _checked(theirs, ours, value, target)
    multi_hot = state.pop("item_encoder.ifeature_cache.weight", None)
    if multi_hot is not None:
        _check_multi_hot(multi_hot, model)
    left = [name for name in state if not name.startswith(IGNORED)]
    if left:
        raise ValueError(f"official state_dict has a tensor the map does not know: {left[0]!r}")
    buffers = {name for name, _ in model.named_buffers()}
    missing = [name for name in target if name not in loaded and name not in buffers]
    if missing:
        raise ValueError(f"no official tensor maps to {missing[0]!r}")
    model.load_state_dict(loaded, strict=False)
    return model.eval()


def _take(state: dict[str, Tensor], name: str) -> Tensor:
    if name not in state:
        raise ValueError(f"official state_dict lacks {name!r}")
    return state.pop(name)


def _checked(theirs: str, ours: str, value: Tensor, target: Mapping[str, Tensor]) -> Tensor:
    expected = tuple(target[ours].shape)
    if tuple(value.shape) != expected:
        raise ValueError(
            f"official tensor {theirs!r} has shape {tuple(value.shape)}, {ours!r} needs "
            f"{expected} (check max_len, levels, heads and the attributes)"
        )
    return value


def _check_multi_hot(multi_hot: Tensor, model: ConvRec) -> None:
    """The authors' frozen multi-hot matrix must be the one ``item_attributes`` describe."""
    encoder = model.item_encoder
    offsets, ids = encoder.attr_offsets, encoder.attr_ids
    expected = torch.zeros(encoder.num_items + 1, encoder.num_attributes, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(len(offsets) - 1), offsets.diff())
    expected.index_put_((rows, ids), torch.ones(len(ids), dtype=torch.float64), accumulate=True)
    if multi_hot.shape != expected.shape or not torch.equal(multi_hot.double().cpu(), expected):
        raise ValueError(
            "official tensor 'item_encoder.ifeature_cache.weight' is not the multi-hot matrix "
            "of item_attributes"
        )
