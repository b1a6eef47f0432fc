"""CLIP, as transformers writes it: the text encoder (``CLIPTextModel``, the text side of Stable
Diffusion), the image tower (``CLIPVisionModel``, a ViT), the two together (``CLIPModel``) and the
image preprocessing (``CLIPImageProcessor``).

Text: token and position embeddings, then pre-norm transformer layers (causal self-attention and
an MLP, each added back to the residual stream), then a final layer norm. Stable Diffusion
conditions its U-Net on that last hidden state; CLIP's pooled text feature is the hidden state at
the end token. Images: one token per patch after a class token, the same layers attending over
every token, and the class token's final state as the pooled feature. CLIPModel projects both
pooled features into one space, where cosine similarity scores an image against a caption. The
attribute names are transformers', so ``text_encoder/`` folders and CLIP folders load by name.
"""

from __future__ import annotations

import numbers
import pathlib

import numpy as np

from .. import functional as F
from ..backend import DEFAULT_DTYPE
from ..nn import Conv2d, Embedding, LayerNorm, Linear, Module, Parameter
from ..nn.attention import Attention, image_tokens
from ..nn.pretrained import Pretrained, PretrainedError, config_error, read_config
from ..tensor import Tensor, tensor
from .tokenizer import CLIPTokenizer


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
    """x + attn(norm1(x)), then x + mlp(norm2(x)); the attention is causal in the text tower and
    over every token in the image tower."""

    def __init__(
        self,
        hidden_size,
        heads,
        intermediate_size,
        hidden_act="quick_gelu",
        eps=1e-5,
        causal=True,
        rng=None,
        dtype=None,
    ):
        self.causal = causal
        self.layer_norm1 = LayerNorm(hidden_size, eps=eps, dtype=dtype)
        self.self_attn = Attention(hidden_size, heads=heads, names="transformers", rng=rng, dtype=dtype)
        self.layer_norm2 = LayerNorm(hidden_size, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act, rng=rng, dtype=dtype)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x), causal=self.causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(Module):
    """Both towers' stack: ``num_hidden_layers`` CLIPEncoderLayers of one size, run in turn.
    ``model`` names the tower in the error for an unknown ``hidden_act``."""

    def __init__(
        self, model, num_hidden_layers, hidden_size, heads, intermediate_size, hidden_act, eps, **kw
    ):
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"{model}: hidden_act must be one of {sorted(ACTIVATIONS)}, got {hidden_act!r}")
        self.layers = [
            CLIPEncoderLayer(hidden_size, heads, intermediate_size, hidden_act, eps, **kw)
            for _ in range(num_hidden_layers)
        ]

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
        self.hidden_size = hidden_size
        self.eos_token_id = eos_token_id
        self.embeddings = CLIPTextEmbeddings(
            vocab_size, hidden_size, max_position_embeddings, rng=rng, dtype=dtype
        )
        sizes = (num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)
        self.encoder = CLIPEncoder("CLIPTextModel", *sizes, hidden_act, layer_norm_eps, rng=rng, dtype=dtype)
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
        return _strip_prefix(
            weights, PREFIX, drop=(POSITION_IDS, PROJECTION) if with_projection else (POSITION_IDS,)
        )

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


# -- the image tower ------------------------------------------------------------------------------

# CLIPVisionConfig's defaults (transformers: ViT-B/32).
VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}
VISION_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
VISION_SIZES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
)


class CLIPVisionEmbeddings(Module):
    """The image as tokens: a class token, then one token per patch (a convolution with stride
    equal to its kernel is a linear map of each patch), plus a learned embedding per position."""

    def __init__(self, hidden_size, num_channels, image_size, patch_size, rng=None, dtype=None):
        self.image_size, self.patch_size = image_size, patch_size
        rng = rng if rng is not None else np.random.default_rng()
        # transformers' start: normal with std hidden_size**-0.5
        self.class_embedding = Parameter(
            rng.standard_normal(hidden_size) * hidden_size**-0.5, dtype=dtype or DEFAULT_DTYPE
        )
        self.patch_embedding = Conv2d(
            num_channels, hidden_size, patch_size, stride=patch_size, bias=False, rng=rng, dtype=dtype
        )
        positions = (image_size // patch_size) ** 2 + 1
        self.position_embedding = Embedding(positions, hidden_size, rng=rng, dtype=dtype)

    def forward(self, pixel_values):
        n = pixel_values.shape[0]
        patches = image_tokens(self.patch_embedding(pixel_values))  # (N, grid*grid, hidden)
        width = self.class_embedding.shape[0]
        cls = F.broadcast_to(F.reshape(self.class_embedding, (1, 1, width)), (n, 1, width))
        return F.concat([cls, patches], axis=1) + self.position_embedding.weight


class CLIPVisionModel(Module, Pretrained):
    """CLIP's image tower, a ViT: ``model(pixel_values)`` -> the last hidden state (N, 1 + patches,
    hidden_size); ``model.encode(pixel_values)`` -> (last hidden state, pooled (N, hidden_size)),
    pooled being the class token after ``post_layernorm``.

    ``pixel_values`` is (N, num_channels, image_size, image_size), already preprocessed
    (``CLIPImageProcessor``). transformers spells the first norm ``pre_layrnorm``; so does this.
    """

    def __init__(
        self,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        rng=None,
        dtype=None,
    ):
        if not 0 < patch_size <= image_size:
            raise ValueError(
                f"CLIPVisionModel: patch_size={patch_size} must be in [1, image_size={image_size}]"
            )
        self.num_channels, self.image_size = num_channels, image_size
        self.embeddings = CLIPVisionEmbeddings(
            hidden_size, num_channels, image_size, patch_size, rng=rng, dtype=dtype
        )
        self.pre_layrnorm = LayerNorm(hidden_size, eps=layer_norm_eps, dtype=dtype)
        sizes = (num_hidden_layers, hidden_size, num_attention_heads, intermediate_size)
        self.encoder = CLIPEncoder(
            "CLIPVisionModel", *sizes, hidden_act, layer_norm_eps, causal=False, rng=rng, dtype=dtype
        )
        self.post_layernorm = LayerNorm(hidden_size, eps=layer_norm_eps, dtype=dtype)
        self.config = {
            **VISION_DEFAULTS,
            **{key: value for key, value in locals().items() if key in VISION_SIZES},
            "hidden_act": hidden_act,
            "layer_norm_eps": layer_norm_eps,
        }

    @classmethod
    def from_config(cls, config: dict, dtype=None, source="config", prefix=""):
        """The tower a CLIPVisionConfig dict describes; a value or key it does not implement is a
        ConfigError naming the key."""
        config = {**VISION_DEFAULTS, **config}
        # eos_token_id: null in the vision configs of older files
        known = (
            set(VISION_DEFAULTS) | {"model_type", "architectures", "dropout", "eos_token_id"} | IGNORED_KEYS
        )
        _check_tower(
            config, source, model_type="clip_vision_model", sizes=VISION_SIZES, known=known, prefix=prefix
        )
        architectures = config.get("architectures") or []
        if not isinstance(architectures, list) or any(a not in VISION_ARCHITECTURES for a in architectures):
            raise config_error(
                source, prefix + "architectures", architectures, " or ".join(VISION_ARCHITECTURES)
            )
        if config["patch_size"] > config["image_size"]:
            raise config_error(
                source,
                prefix + "patch_size",
                config["patch_size"],
                f"at most image_size={config['image_size']}",
            )
        model = cls(
            **{key: config[key] for key in VISION_SIZES},
            hidden_act=config["hidden_act"],
            layer_norm_eps=float(config["layer_norm_eps"]),
            dtype=dtype,
        )
        model.config = config
        return model

    def adapt_weights(self, weights: dict) -> dict:
        """Drop the ``vision_model.`` prefix of transformers 4's CLIPVisionModel files and the
        stored ``position_ids`` buffer."""
        return _strip_prefix(weights, "vision_model.", drop=(POSITION_IDS,))

    def _pixels(self, pixel_values):
        """A Tensor as it is (its graph kept); an array as a Tensor of the model's dtype and device."""
        weight = self.embeddings.class_embedding
        x = pixel_values
        kind = np.dtype(x.dtype).kind if hasattr(x, "dtype") else None
        expected = (self.num_channels, self.image_size, self.image_size)
        if kind != "f" or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"CLIPVisionModel: pixel_values must be floats (N, {', '.join(map(str, expected))}), "
                f"got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
            )
        return x if isinstance(x, Tensor) else tensor(x, dtype=weight.dtype, device=weight.device)

    def forward(self, pixel_values):
        return self.encode(pixel_values)[0]

    def encode(self, pixel_values):
        x = self.pre_layrnorm(self.embeddings(self._pixels(pixel_values)))
        hidden = self.encoder(x)
        return hidden, self.post_layernorm(F.getitem(hidden, (slice(None), 0)))


def _strip_prefix(weights, prefix, drop=()):
    """``weights`` with ``prefix`` taken off the names that carry it and the names in ``drop``
    (after that) left out; a name present both ways is a PretrainedError."""
    adapted = {}
    for key, value in weights.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name in drop:
            continue
        if name in adapted:
            raise PretrainedError(f"the weights hold {name} both with and without the prefix {prefix!r}")
        adapted[name] = value
    return adapted


# -- the two towers together ----------------------------------------------------------------------

CLIP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592, "initializer_factor": 1.0}
CLIP_KNOWN = (
    set(CLIP_DEFAULTS)
    | {
        "model_type",
        "architectures",
        "text_config",
        "vision_config",
        "text_config_dict",
        "vision_config_dict",
    }
    | IGNORED_KEYS
)


def normalize(x):
    """x / |x| along the last axis: CLIP compares directions only."""
    return x / F.sqrt(F.sum(x * x, axis=-1, keepdims=True))


class CLIPModel(Module, Pretrained):
    """CLIP, as transformers' ``CLIPModel``: the text tower and the image tower, each followed by a
    linear projection (no bias) into one shared space, and the learned temperature ``logit_scale``
    (log of the factor the cosine similarities are multiplied by).

    ``get_text_features(input_ids)`` -> (N, projection_dim); ``get_image_features(pixel_values)``
    -> (M, projection_dim); ``model(input_ids, pixel_values)`` -> (logits_per_image (M, N),
    logits_per_text (N, M)), exp(logit_scale) times the cosine similarities.

    ``from_pretrained(folder)`` reads a transformers CLIP folder: config.json with its
    ``text_config`` and ``vision_config``, the weights, and where present
    ``preprocessor_config.json`` (``model.image_processor``) and the tokenizer files
    (``model.tokenizer``); either is None when the folder lacks it.
    """

    def __init__(
        self,
        text_model,
        vision_model,
        projection_dim=512,
        logit_scale_init_value=2.6592,
        rng=None,
        dtype=None,
    ):
        self.text_model = text_model
        self.vision_model = vision_model
        self.visual_projection = Linear(
            vision_model.config["hidden_size"], projection_dim, bias=False, rng=rng, dtype=dtype
        )
        self.text_projection = Linear(
            text_model.hidden_size, projection_dim, bias=False, rng=rng, dtype=dtype
        )
        self.logit_scale = Parameter(np.array(logit_scale_init_value), dtype=dtype or DEFAULT_DTYPE)
        self.tokenizer = None
        self.image_processor = None
        self.config = {
            **CLIP_DEFAULTS,
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": projection_dim,
            "logit_scale_init_value": logit_scale_init_value,
            "text_config": {**text_model.config, "model_type": "clip_text_model"},
            "vision_config": {**vision_model.config, "model_type": "clip_vision_model"},
        }

    @classmethod
    def from_config(cls, config: dict, dtype=None, source="config"):
        """The model a CLIPConfig dict describes (``text_config_dict`` / ``vision_config_dict``,
        which older files carry, override ``text_config`` / ``vision_config`` key by key, as in
        transformers); a value or key it does not implement is a ConfigError naming the key."""
        config = {**CLIP_DEFAULTS, **config}
        if config.get("model_type", "clip") != "clip":
            raise config_error(
                source, "model_type", config["model_type"], "'clip' (a CLIPModel folder's config)"
            )
        architectures = config.get("architectures") or []
        if not isinstance(architectures, list) or any(a != "CLIPModel" for a in architectures):
            raise config_error(source, "architectures", architectures, "CLIPModel")
        for key in config:
            if key not in CLIP_KNOWN:
                raise config_error(source, key, config[key], "the keys of a CLIPConfig")
        if not _is_size(config["projection_dim"]):
            raise config_error(source, "projection_dim", config["projection_dim"], "a positive integer")
        scale = config["logit_scale_init_value"]
        if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
            raise config_error(source, "logit_scale_init_value", scale, "a number")
        towers = {}
        for name in ("text_config", "vision_config"):
            for key in (name, f"{name}_dict"):
                if not isinstance(config.get(key) or {}, dict):
                    raise config_error(source, key, config[key], "an object of the tower's settings")
            towers[name] = {**(config.get(name) or {}), **(config.get(f"{name}_dict") or {})}
        text = {**DEFAULTS, **towers["text_config"]}
        _check_config(text, source, prefix="text_config.")
        text_model = CLIPTextModel.from_config(text, dtype=dtype, source=source)
        vision_model = CLIPVisionModel.from_config(
            towers["vision_config"], dtype=dtype, source=source, prefix="vision_config."
        )
        model = cls(text_model, vision_model, config["projection_dim"], float(scale), dtype=dtype)
        model.config = config
        return model

    @classmethod
    def from_pretrained(cls, folder, dtype=None, variant=None):
        model = super().from_pretrained(folder, dtype=dtype, variant=variant)
        folder = pathlib.Path(folder)
        if (folder / PREPROCESSOR_CONFIG).is_file():
            model.image_processor = CLIPImageProcessor.from_pretrained(folder)
        if any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            model.tokenizer = CLIPTokenizer.from_pretrained(folder)
        return model

    def adapt_weights(self, weights: dict) -> dict:
        """Drop the stored ``position_ids`` buffers some files carry."""
        drop = {f"{tower}.{POSITION_IDS}" for tower in ("text_model", "vision_model")}
        return {key: value for key, value in weights.items() if key not in drop}

    def get_text_features(self, input_ids):
        return self.text_projection(self.text_model.encode(input_ids)[1])

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model.encode(pixel_values)[1])

    def forward(self, input_ids, pixel_values):
        text = normalize(self.get_text_features(input_ids))
        image = normalize(self.get_image_features(pixel_values))
        logits_per_text = F.matmul(text, F.transpose(image)) * F.exp(self.logit_scale)
        return F.transpose(logits_per_text), logits_per_text


def _is_size(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_tower(config, source, *, model_type, sizes, known, prefix="", what=""):
    """Raise a ConfigError for the first key of one tower's ``config`` (keys named with
    ``prefix``, e.g. ``vision_config.``) that the tower does not implement."""

    def refuse(key, supported):
        return config_error(source, prefix + key, config[key], supported)

    if config.get("model_type", model_type) != model_type:
        raise refuse("model_type", f"{model_type!r}{what}")
    for key in sizes:
        if not _is_size(config[key]):
            raise refuse(key, "a positive integer")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise refuse("num_attention_heads", f"a divisor of hidden_size={config['hidden_size']}")
    if config["hidden_act"] not in ACTIVATIONS:
        raise refuse("hidden_act", " or ".join(ACTIVATIONS))
    eps = config["layer_norm_eps"]
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps > 0:
        raise refuse("layer_norm_eps", "a positive number")
    for key in ("attention_dropout", "dropout"):
        if config.get(key) not in (None, 0):
            raise refuse(key, "0 (no dropout)")
    for key in config:
        if key not in known:
            raise refuse(key, f"the keys of a {type_name(model_type)}")


def type_name(model_type):
    return {"clip_text_model": "CLIPTextConfig", "clip_vision_model": "CLIPVisionConfig"}[model_type]


def _check_config(config, source, prefix=""):
    """Raise a ConfigError for the first key of a text ``config`` CLIPTextModel does not implement."""
    known = set(DEFAULTS) | {"model_type", "architectures", "dropout"} | IGNORED_KEYS
    what = " (a text_encoder folder's config)" if not prefix else ""
    _check_tower(
        config, source, model_type="clip_text_model", sizes=SIZES, known=known, prefix=prefix, what=what
    )
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or any(a not in ARCHITECTURES for a in architectures):
        raise config_error(source, prefix + "architectures", architectures, " or ".join(ARCHITECTURES))
    eos = config["eos_token_id"]
    if not isinstance(eos, numbers.Integral) or isinstance(eos, bool):
        raise config_error(source, prefix + "eos_token_id", eos, "one integer token id")


# -- CLIP's image preprocessing -------------------------------------------------------------------

PREPROCESSOR_CONFIG = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL's code (and transformers' PILImageResampling) for bicubic resampling
PROCESSOR_DEFAULTS = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": BICUBIC,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD),
    "do_convert_rgb": True,
}
# Names of the processor's class, which change nothing in what it computes.
PROCESSOR_IGNORED = {"image_processor_type", "feature_extractor_type", "processor_class"}


class CLIPImageProcessor:
    """uint8 images (N, C, H, W) -> CLIP's ``pixel_values`` (N, 3, crop, crop) float32, as
    transformers' CLIPImageProcessor computes them: the shortest side resized to ``size`` with
    Pillow's bicubic filter on the uint8 image (the long side to int(size * long / short)), a
    centre crop (zero padding where the image is smaller), then x * rescale_factor and
    (x - mean) / std per channel in float32. Grey images (C = 1) are repeated to RGB.

    ``size`` is the shortest side (an int) or an exact (height, width); ``crop_size`` a (height,
    width). ``from_pretrained(folder)`` reads ``preprocessor_config.json``.
    """

    def __init__(
        self,
        size=224,
        crop_size=(224, 224),
        resample=BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        rescale_factor=1 / 255,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
    ):
        self.size, self.crop_size, self.resample = size, tuple(crop_size), resample
        self.image_mean = np.asarray(image_mean, np.float32)
        self.image_std = np.asarray(image_std, np.float32)
        self.rescale_factor = rescale_factor
        self.do_resize, self.do_center_crop = do_resize, do_center_crop
        self.do_rescale, self.do_normalize = do_rescale, do_normalize

    @classmethod
    def from_config(cls, config: dict, source="config"):
        """The processor a preprocessor_config.json describes; a value it does not implement is
        a ConfigError naming the key."""
        config = {**PROCESSOR_DEFAULTS, **config}
        for key in config:
            if key not in PROCESSOR_DEFAULTS and key not in PROCESSOR_IGNORED:
                raise config_error(source, key, config[key], "the keys of CLIPImageProcessor")
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(config[key], bool):
                raise config_error(source, key, config[key], "true or false")
        size = config["size"]
        if _is_size(size):  # older files: the shortest side
            pass
        elif isinstance(size, dict) and set(size) == {"shortest_edge"} and _is_size(size["shortest_edge"]):
            size = size["shortest_edge"]
        elif (
            isinstance(size, dict) and set(size) == {"height", "width"} and all(map(_is_size, size.values()))
        ):
            size = (size["height"], size["width"])
        else:
            raise config_error(source, "size", size, "{'shortest_edge': S} or {'height': H, 'width': W}")
        crop = config["crop_size"]
        if _is_size(crop):
            crop = (crop, crop)
        elif (
            isinstance(crop, dict) and set(crop) == {"height", "width"} and all(map(_is_size, crop.values()))
        ):
            crop = (crop["height"], crop["width"])
        else:
            raise config_error(source, "crop_size", crop, "{'height': H, 'width': W}")
        if config["resample"] not in range(6):
            raise config_error(source, "resample", config["resample"], "a Pillow resampling filter 0-5")
        for key in ("image_mean", "image_std"):
            value = config[key]
            if not (
                isinstance(value, (list, tuple))
                and len(value) == 3
                and all(isinstance(v, numbers.Real) for v in value)
            ):
                raise config_error(source, key, value, "three numbers (R, G, B)")
        if not all(v > 0 for v in config["image_std"]):
            raise config_error(source, "image_std", config["image_std"], "positive numbers")
        factor = config["rescale_factor"]
        if not isinstance(factor, numbers.Real) or isinstance(factor, bool):
            raise config_error(source, "rescale_factor", factor, "a number")
        return cls(
            size=size,
            crop_size=crop,
            resample=config["resample"],
            image_mean=config["image_mean"],
            image_std=config["image_std"],
            rescale_factor=float(factor),
            do_resize=config["do_resize"],
            do_center_crop=config["do_center_crop"],
            do_rescale=config["do_rescale"],
            do_normalize=config["do_normalize"],
        )

    @classmethod
    def from_pretrained(cls, folder):
        return cls.from_config(
            read_config(folder, PREPROCESSOR_CONFIG), source=pathlib.Path(folder) / PREPROCESSOR_CONFIG
        )

    def to_dict(self) -> dict:
        """The preprocessor_config.json of this processor."""
        size = (
            {"shortest_edge": self.size}
            if isinstance(self.size, int)
            else dict(zip(("height", "width"), self.size))
        )
        return {
            **PROCESSOR_DEFAULTS,
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.image_mean.tolist(),
            "image_std": self.image_std.tolist(),
            "image_processor_type": "CLIPImageProcessor",
        }

    def _resized_shape(self, height, width):
        if not isinstance(self.size, int):
            return self.size
        if width <= height:  # transformers' (and torchvision's) rule, truncating the long side
            return int(self.size * height / width), self.size
        return self.size, int(self.size * width / height)

    def _center_crop(self, image):  # (C, H, W), padded with zeros where smaller than the crop
        _, height, width = image.shape
        ch, cw = self.crop_size
        top, left = (height - ch) // 2, (width - cw) // 2
        if top >= 0 and left >= 0:
            return image[:, top : top + ch, left : left + cw]
        padded = np.zeros((image.shape[0], max(ch, height), max(cw, width)), image.dtype)
        pt, pl = -(-(padded.shape[1] - height) // 2), -(-(padded.shape[2] - width) // 2)
        padded[:, pt : pt + height, pl : pl + width] = image
        return padded[:, max(0, top + pt) : top + pt + ch, max(0, left + pl) : left + pl + cw]

    def __call__(self, images) -> np.ndarray:
        from PIL import Image

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(
                "CLIPImageProcessor: images must be uint8 (N, 1 or 3, H, W), "
                f"got {images.dtype} {images.shape}"
            )
        if images.shape[1] == 1:
            images = np.repeat(images, 3, axis=1)
        out = []
        for image in images:
            if self.do_resize:
                height, width = self._resized_shape(*image.shape[1:])
                pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
                image = np.asarray(pil.resize((width, height), resample=self.resample)).transpose(2, 0, 1)
            if self.do_center_crop:
                image = self._center_crop(image)
            x = (image.astype(np.float64) * self.rescale_factor if self.do_rescale else image).astype(
                np.float32
            )
            if self.do_normalize:
                x = (x - self.image_mean[:, None, None]) / self.image_std[:, None, None]
            out.append(x)
        return np.stack(out)
