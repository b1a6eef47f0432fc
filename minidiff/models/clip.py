"""CLIP's text encoder, as transformers' ``CLIPTextModel``: the text side of Stable Diffusion.

Token and position embeddings, then pre-norm transformer layers (causal self-attention and an MLP,
each added back to the residual stream), then a final layer norm. Stable Diffusion conditions its
U-Net on that last hidden state; CLIP's pooled text feature is the hidden state at the end token.
The attribute names are transformers', so a ``text_encoder/`` folder loads by name.
"""

from __future__ import annotations

import numbers

from .. import functional as F
from ..nn import Embedding, LayerNorm, Linear, Module
from ..nn.attention import Attention
from ..nn.pretrained import Pretrained, PretrainedError, config_error
from ..tensor import tensor


def quick_gelu(x):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * F.sigmoid(1.702 * x)


def gelu(x):
    """The exact GELU, x * Phi(x) (erf, not tanh)."""
    return F.gelu(x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}

# CLIPTextConfig's defaults (transformers), filled into ``config`` where a file leaves them out.
DEFAULTS = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
# Keys that change nothing in the forward pass: initialization, bookkeeping, and the generic
# settings transformers' PretrainedConfig writes (outputs, generation, labels, serialization).
IGNORED_KEYS = frozenset(
    """
    initializer_range initializer_factor projection_dim pad_token_id bos_token_id
    _name_or_path _commit_hash transformers_version torch_dtype dtype _attn_implementation_internal
    return_dict output_hidden_states output_attentions torchscript use_bfloat16 tf_legacy_loss
    pruned_heads tie_word_embeddings chunk_size_feed_forward is_encoder_decoder is_decoder
    cross_attention_hidden_size add_cross_attention tie_encoder_decoder gradient_checkpointing use_cache
    max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores
    return_dict_in_generate forced_bos_token_id forced_eos_token_id remove_invalid_values
    exponential_decay_length_penalty suppress_tokens begin_suppress_tokens finetuning_task
    id2label label2id tokenizer_class prefix sep_token_id decoder_start_token_id task_specific_params
    problem_type
    """.split()
)
PREFIX = "text_model."  # CLIPTextModel files of transformers 4 (and CLIPTextModelWithProjection's)
POSITION_IDS = "embeddings.position_ids"  # a buffer some files store: arange(max_position_embeddings)
PROJECTION = "text_projection.weight"  # CLIPTextModelWithProjection's head, outside the text model


class CLIPTextEmbeddings(Module):
    """Token embedding plus the learned embedding of each position."""

    def __init__(self, vocab_size, hidden_size, max_position_embeddings, rng=None, dtype=None):
        self.token_embedding = Embedding(vocab_size, hidden_size, rng=rng, dtype=dtype)
        self.position_embedding = Embedding(max_position_embeddings, hidden_size, rng=rng, dtype=dtype)

    def forward(self, input_ids):
        length = input_ids.shape[-1]
        positions = self.position_embedding.weight.shape[0]
        if length > positions:
            raise ValueError(f"CLIPTextModel: {length} tokens, more than max_position_embeddings={positions}")
        xp = input_ids.device.xp
        return self.token_embedding(input_ids) + self.position_embedding(tensor(xp.arange(length)))


class CLIPMLP(Module):
    def __init__(self, hidden_size, intermediate_size, hidden_act="quick_gelu", rng=None, dtype=None):
        self.hidden_act = hidden_act
        self.fc1 = Linear(hidden_size, intermediate_size, rng=rng, dtype=dtype)
        self.fc2 = Linear(intermediate_size, hidden_size, rng=rng, dtype=dtype)

    def forward(self, x):
        return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); the attention is causal."""

    def __init__(
        self, hidden_size, heads, intermediate_size, hidden_act="quick_gelu", eps=1e-5, rng=None, dtype=None
    ):
        self.layer_norm1 = LayerNorm(hidden_size, eps=eps, dtype=dtype)
        self.self_attn = Attention(hidden_size, heads=heads, names="transformers", rng=rng, dtype=dtype)
        self.layer_norm2 = LayerNorm(hidden_size, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act, rng=rng, dtype=dtype)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x), causal=True)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(Module):
    def __init__(self, layers):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(Module, Pretrained):
    """``model(input_ids)`` -> the last hidden state (N, L, hidden_size), after the final layer
    norm; ``model.encode(input_ids)`` -> (last hidden state, pooled (N, hidden_size)).

    ``input_ids`` is an integer array (N, L) (NumPy, CuPy or an integer Tensor), L at most
    ``max_position_embeddings``; every position attends only to itself and those before it.
    """

    def __init__(
        self,
        vocab_size=49408,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        eos_token_id=49407,
        rng=None,
        dtype=None,
    ):
        if hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"CLIPTextModel: hidden_act must be one of {sorted(ACTIVATIONS)}, got {hidden_act!r}"
            )
        self.hidden_size = hidden_size
        self.eos_token_id = eos_token_id
        self.embeddings = CLIPTextEmbeddings(
            vocab_size, hidden_size, max_position_embeddings, rng=rng, dtype=dtype
        )
        layer = dict(
            hidden_size=hidden_size,
            heads=num_attention_heads,
            intermediate_size=intermediate_size,
            hidden_act=hidden_act,
            eps=layer_norm_eps,
            rng=rng,
            dtype=dtype,
        )
        self.encoder = CLIPEncoder(CLIPEncoderLayer(**layer) for _ in range(num_hidden_layers))
        self.final_layer_norm = LayerNorm(hidden_size, eps=layer_norm_eps, dtype=dtype)
        self.config = {
            **DEFAULTS,
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "max_position_embeddings": max_position_embeddings,
            "hidden_act": hidden_act,
            "layer_norm_eps": layer_norm_eps,
            "eos_token_id": eos_token_id,
        }

    library = "transformers"

    # -- building from a transformers config --------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, dtype=None, source="config"):
        """The model a CLIPTextConfig dict describes; a value or key it does not implement is a
        ConfigError naming the key."""
        config = {**DEFAULTS, **config}
        _check_config(config, source)
        model = cls(
            **{key: config[key] for key in SIZES},
            hidden_act=config["hidden_act"],
            layer_norm_eps=float(config["layer_norm_eps"]),
            eos_token_id=config["eos_token_id"],
            dtype=dtype,
        )
        model.config = config
        return model

    def adapt_weights(self, weights: dict) -> dict:
        """Drop the ``text_model.`` prefix (transformers 4 files, and those of
        CLIPTextModelWithProjection), the stored ``position_ids`` buffer, and, for a
        CLIPTextModelWithProjection file, its ``text_projection`` head, which is not part of the
        text model."""
        with_projection = "CLIPTextModelWithProjection" in (self.config.get("architectures") or ())
        adapted = {}
        for key, value in weights.items():
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            if name == POSITION_IDS or (with_projection and name == PROJECTION):
                continue
            if name in adapted:
                raise PretrainedError(f"the weights hold {name} both with and without the prefix {PREFIX!r}")
            adapted[name] = value
        return adapted

    def pretrained_config(self) -> dict:
        return {**super().pretrained_config(), "model_type": "clip_text_model"}

    def export_weights(self) -> dict:
        """The parameters under transformers' names: the ``text_model.`` prefix its CLIPTextModel
        files carry."""
        return {PREFIX + name: value for name, value in self.state_dict().items()}

    # -- the forward pass ----------------------------------------------------------------------
    def _ids(self, input_ids):
        device = self.embeddings.token_embedding.weight.device
        ids = tensor(input_ids, device=device)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(
                f"CLIPTextModel: input_ids must be an integer array (N, L), got {ids.dtype} {ids.shape}"
            )
        return ids

    def forward(self, input_ids):
        return self._last_hidden_state(self._ids(input_ids))

    def _last_hidden_state(self, ids):
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))

    def encode(self, input_ids):
        """(last hidden state (N, L, hidden_size), pooled (N, hidden_size)): pooled is the hidden
        state at each sequence's first end token (``eos_token_id``), or, for configs that still
        carry the old ``eos_token_id=2``, at its largest id (the end token is CLIP's last id)."""
        ids = self._ids(input_ids)
        hidden = self._last_hidden_state(ids)
        xp = ids.device.xp
        if self.eos_token_id == 2:
            ends = xp.argmax(ids.data, axis=-1)
        else:  # no end token: position 0, as transformers' argmax over all-False gives
            ends = xp.argmax(ids.data == self.eos_token_id, axis=-1)
        return hidden, F.getitem(hidden, (xp.arange(ids.shape[0]), ends))


def _is_size(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_config(config, source):
    """Raise a ConfigError for the first key of ``config`` CLIPTextModel does not implement."""
    if config.get("model_type", "clip_text_model") != "clip_text_model":
        raise config_error(
            source, "model_type", config["model_type"], "'clip_text_model' (a text_encoder folder's config)"
        )
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or any(a not in ARCHITECTURES for a in architectures):
        raise config_error(source, "architectures", architectures, " or ".join(ARCHITECTURES))
    for key in SIZES:
        if not _is_size(config[key]):
            raise config_error(source, key, config[key], "a positive integer")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise config_error(
            source,
            "num_attention_heads",
            config["num_attention_heads"],
            f"a divisor of hidden_size={config['hidden_size']}",
        )
    if config["hidden_act"] not in ACTIVATIONS:
        raise config_error(source, "hidden_act", config["hidden_act"], " or ".join(ACTIVATIONS))
    eps = config["layer_norm_eps"]
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise config_error(source, "layer_norm_eps", eps, "a positive number")
    for key in ("attention_dropout", "dropout"):
        if config.get(key) not in (None, 0):
            raise config_error(source, key, config[key], "0 (no dropout)")
    eos = config["eos_token_id"]
    if not isinstance(eos, numbers.Integral) or isinstance(eos, bool):
        raise config_error(source, "eos_token_id", eos, "one integer token id")
    known = set(DEFAULTS) | {"model_type", "architectures", "dropout"} | IGNORED_KEYS
    for key in config:
        if key not in known:
            raise config_error(source, key, config[key], "the keys of a CLIPTextConfig")
