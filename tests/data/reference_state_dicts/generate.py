"""Regenerates the reference state-dict manifests ({name: shape}) of the ORIGINAL CompVis networks.

Not run by the tests. Run it with the original code importable (never part of this repository), e.g.::

    mkdir -p /tmp/orig && <extract CompVis/latent-diffusion's ldm/ into /tmp/orig>
    # stub modules the original imports but the networks do not need: clip, kornia
    PYTHONPATH=/tmp/orig:/tmp/shim python tests/data/reference_state_dicts/generate.py <reference-configs dir>

Every network is built on the meta device (no memory, no weights). Identical manifests are stored once;
``index.json`` maps each config file (relative to the reference-configs dir) to its manifest files.
The FrozenCLIPEmbedder manifest is the ViT-L/14 CLIP text model of Hugging Face transformers under the
``transformer.text_model.`` prefix, plus the ``position_ids`` buffer, as in Stable Diffusion v1 checkpoints.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).parent


def build_original(cfg):
    import importlib
    target = cfg["target"]
    if target.endswith("FrozenCLIPEmbedder"):
        from transformers import CLIPTextConfig, CLIPTextModel
        conf = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                              hidden_act="quick_gelu")
        model = CLIPTextModel(conf)
        # transformers >= 5 dropped the `text_model` level that SD v1 checkpoints (transformers 4.x) have
        sd = {"transformer.text_model." + k.removeprefix("text_model."): list(v.shape)
              for k, v in model.state_dict().items()}
        sd["transformer.text_model.embeddings.position_ids"] = [1, 77]
        return sd
    module, name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    params = dict(cfg.get("params") or {})
    if name == "BERTEmbedder":  # the tokenizer has no parameters and would download a vocabulary
        import ldm.modules.encoders.modules as m
        m.BERTTokenizer = lambda **kw: torch.nn.Identity()
    model = cls(**params)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def main(root):
    root = Path(root)
    files = sorted(root.glob("latent-diffusion/models/ldm/*/config.yaml"))
    files += sorted(root.glob("latent-diffusion/configs/latent-diffusion/*.yaml"))
    files += [root / "latent-diffusion/configs/retrieval-augmented-diffusion/768x768.yaml",
              root / "stable-diffusion/configs/stable-diffusion/v1-inference.yaml"]
    index, seen = {}, {}
    for f in files:
        rel = str(f.relative_to(root))
        stem = f.parent.name if f.name == "config.yaml" else f.stem
        params = yaml.safe_load(f.read_text())["model"]["params"]
        entry = {}
        for kind, key in (("unet", "unet_config"), ("cond", "cond_stage_config")):
            cfg = params.get(key)
            if not isinstance(cfg, dict) or not cfg["target"].startswith("ldm."):
                continue
            with torch.device("meta"):
                manifest = build_original(cfg)
            digest = hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
            if digest not in seen:
                seen[digest] = f"{stem}.{kind}.json"
                (HERE / seen[digest]).write_text(json.dumps(manifest, indent=0) + "\n")
            entry[kind] = seen[digest]
        index[rel] = entry
    (HERE / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
