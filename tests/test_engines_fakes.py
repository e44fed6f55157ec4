"""Hand-built ONNX exports for the engine tests (no PyTorch export): tiny graphs with each family's real IO.

Each component is a small ONNX graph with exactly the inputs, outputs, dtypes and symbolic dims
that `latentrt.tensors.component_ios` gives the family, saved with external data like a real
export, plus a manifest in the ONNX export format. The UNet holds an attention-shaped
MatMul/Softmax island named like the exporter names diffusers' attention (`.../attn1/MatMul`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from latentrt.families import get_family
from latentrt.manifest import MANIFEST, ONNX_KIND, SCHEMA, atomic_write_json, sha256_tree
from latentrt.tensors import ComponentIO, ModelDims, Scaled, TensorSpec, component_ios, io_to_json

OPSET = 18
IR_VERSION = 9  # onnx 1.23 defaults to IR 14, which ONNX Runtime 1.32 rejects
VOCAB = 49408
ONNX_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}


def fake_dims(family: str) -> ModelDims:
    spec = get_family(family)
    hidden: tuple[int, ...] = tuple(12 if te.pooled else 8 for te in spec.text_encoders)
    context = sum(hidden)  # SDXL concatenates both encoders' hidden states
    # the UNet config values non-optional inputs read (the x4 upscaler's noise-level count, issue 12): a tiny UNet's
    unet_config = {k: dict((*c.unet_config, *c.tiny_config)).get(k, 10) for c in spec.denoiser.conditioning
                   if not c.optional for k in c.config_keys}
    image = spec.image_encoder is not None  # issue 12: Stable unCLIP's image side
    return ModelDims(text_hidden=hidden, pooled_dim=6 if spec.has_pooled else 0, context_dim=context,
                     unet_in_channels=spec.unet_in_channels, latent_channels=spec.latent_channels,
                     vae_scale_factor=spec.vae_scale_factor,
                     time_ids=spec.time_ids.width, unet_config=unet_config, image_size=8 * image,
                     image_embed_dim=6 * image, image_noise_levels=1000 * image)


def _value_info(t: TensorSpec) -> onnx.ValueInfoProto:
    dims = [a if isinstance(a, int) else a.name for a in t.shape]
    return helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], dims)


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _text_graph(io: ComponentIO, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    hidden = io.outputs[0].shape[2]
    assert isinstance(hidden, int)
    inits = [_const("embedding", rng.standard_normal((VOCAB, hidden)).astype(np.float32) * 0.1),
             _const("ln_scale", np.ones(hidden, np.float32))]
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], name="/embeddings/Gather"),
             helper.make_node("Tanh", ["embedded"], ["hidden_states"], name="/final/Tanh")]
    if len(io.outputs) > 1:
        pooled = io.outputs[1].shape[1]
        assert isinstance(pooled, int)
        inits += [_const("proj", rng.standard_normal((hidden, pooled)).astype(np.float32) * 0.3),
                  _const("axes1", np.array([1], np.int64))]
        nodes += [helper.make_node("ReduceMean", ["hidden_states", "axes1"], ["pooled"], keepdims=0, name="/pool/Mean"),
                  helper.make_node("MatMul", ["pooled", "proj"], ["text_embeds"], name="/text_projection/MatMul")]
    return nodes, inits


def _unet_graph(io: ComponentIO, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    cin = io.inputs[0].shape[1]
    cout = io.outputs[0].shape[1]
    assert isinstance(cin, int) and isinstance(cout, int)
    inits = [_const("conv_w", rng.standard_normal((cout, cin, 1, 1)).astype(np.float32) * 0.3),
             _const("conv_b", rng.standard_normal(cout).astype(np.float32) * 0.1),
             _const("shape_b111", np.array([-1, 1, 1, 1], np.int64)),
             _const("t_scale", np.array(1e-3, np.float32)),
             _const("axes12", np.array([1, 2], np.int64)),
             _const("axes1", np.array([1], np.int64))]
    nodes = [
        helper.make_node("Conv", ["sample", "conv_w", "conv_b"], ["conv"], name="/conv_in/Conv"),
        helper.make_node("Mul", ["timestep", "t_scale"], ["t_scaled"], name="/time/Mul"),
        helper.make_node("Reshape", ["t_scaled", "shape_b111"], ["t4"], name="/time/Reshape"),
        helper.make_node("Add", ["conv", "t4"], ["a1"], name="/add_time"),
    ]
    last = "a1"
    if any(t.name == "encoder_hidden_states" for t in io.inputs):  # a UNet2DModel (issue 12) has no context
        nodes += [  # attention island: softmax(ehs @ ehs^T) @ ehs
            helper.make_node("Transpose", ["encoder_hidden_states"], ["ehs_t"], perm=[0, 2, 1],
                             name="/attn1/Transpose"),
            helper.make_node("MatMul", ["encoder_hidden_states", "ehs_t"], ["scores"], name="/mid/attn1/MatMul"),
            helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="/mid/attn1/Softmax"),
            helper.make_node("MatMul", ["probs", "encoder_hidden_states"], ["attended"], name="/mid/attn1/MatMul_1"),
            helper.make_node("ReduceMean", ["attended", "axes12"], ["ctx"], keepdims=0, name="/mid/ReduceMean"),
            helper.make_node("Reshape", ["ctx", "shape_b111"], ["ctx4"], name="/mid/Reshape"),
            helper.make_node("Add", ["a1", "ctx4"], ["a2"], name="/add_ctx")]
        last = "a2"
    # SDXL text_embeds / time_ids; one value per row (class labels, issue 12)
    for extra in [t for t in io.inputs[2:] if t.name != "encoder_hidden_states"]:
        if len(extra.shape) == 1:
            nodes.append(helper.make_node("Cast", [extra.name], [f"{extra.name}_m"], to=onnx.TensorProto.FLOAT,
                                          name=f"/add_embedding/{extra.name}/Cast"))
        else:
            nodes.append(helper.make_node("ReduceMean", [extra.name, "axes1"], [f"{extra.name}_m"], keepdims=0,
                                          name=f"/add_embedding/{extra.name}/ReduceMean"))
        nodes += [
                  helper.make_node("Mul", [f"{extra.name}_m", "t_scale"], [f"{extra.name}_s"],
                                   name=f"/add_embedding/{extra.name}/Mul"),
                  helper.make_node("Reshape", [f"{extra.name}_s", "shape_b111"], [f"{extra.name}_4"],
                                   name=f"/add_embedding/{extra.name}/Reshape"),
                  helper.make_node("Add", [last, f"{extra.name}_4"], [f"{last}_{extra.name}"],
                                   name=f"/add_embedding/{extra.name}/Add")]
        last = f"{last}_{extra.name}"
    nodes.append(helper.make_node("Identity", [last], ["out_sample"], name="/conv_out/Identity"))
    return nodes, inits


def _factor(t: TensorSpec) -> int:
    """The VAE factor of an image tensor (its Scaled height axis): 8, the x4 upscaler's 4 (issue 12)."""
    axis = t.shape[2]
    return axis.factor if isinstance(axis, Scaled) else 8


def _vae_encoder_graph(io: ComponentIO, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    cout = io.outputs[0].shape[1]
    f = _factor(io.inputs[0])
    assert isinstance(cout, int)
    inits = [_const("enc_w", rng.standard_normal((cout, 3, 1, 1)).astype(np.float32) * 0.5)]
    nodes = [helper.make_node("AveragePool", ["images"], ["pooled"], kernel_shape=[f, f], strides=[f, f],
                              name="/encoder/AveragePool"),
             helper.make_node("Conv", ["pooled", "enc_w"], [io.outputs[0].name],  # a VQ encoder's is "latent"
                              name="/quant_conv/Conv")]
    return nodes, inits


def _vae_decoder_graph(io: ComponentIO, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    cin = io.inputs[0].shape[1]
    assert isinstance(cin, int)
    inits = [_const("dec_w", rng.standard_normal((3, cin, 1, 1)).astype(np.float32) * 0.5),
             _const("roi", np.array([], np.float32)),
             _const("scales", np.array([1, 1, _factor(io.outputs[0]), _factor(io.outputs[0])], np.float32))]
    nodes = [helper.make_node("Conv", [io.inputs[0].name, "dec_w"], ["small"], name="/post_quant_conv/Conv"),
             helper.make_node("Resize", ["small", "roi", "scales"], ["big"], mode="nearest", name="/decoder/Resize"),
             helper.make_node("Tanh", ["big"], ["images"], name="/decoder/Tanh")]
    return nodes, inits


def _image_encoder_graph(io: ComponentIO, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    """issue 12 (unCLIP): pixel_values (B, 3, S, S) -> image_embeds (B, D): a spatial mean, then a projection."""
    width = io.outputs[0].shape[1]
    assert isinstance(width, int)
    inits = [_const("proj", rng.standard_normal((3, width)).astype(np.float32) * 0.5),
             _const("axes23", np.array([2, 3], np.int64))]
    nodes = [helper.make_node("ReduceMean", ["pixel_values", "axes23"], ["pooled"], keepdims=0, name="/vision/Mean"),
             helper.make_node("MatMul", ["pooled", "proj"], ["image_embeds"], name="/visual_projection/MatMul")]
    return nodes, inits


def _image_noising_graph(io: ComponentIO, rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    """issue 12 (unCLIP): image_embeds + noise, ++ noise scaled by the level: (B, 2D)."""
    inits = [_const("level_scale", np.array(1e-3, np.float32)), _const("axes1", np.array([1], np.int64))]
    nodes = [helper.make_node("Add", ["image_embeds", "noise"], ["noised"], name="/noise/Add"),
             helper.make_node("Cast", ["noise_level"], ["level_f"], to=TensorProto.FLOAT, name="/level/Cast"),
             helper.make_node("Mul", ["level_f", "level_scale"], ["level_s"], name="/level/Mul"),
             helper.make_node("Unsqueeze", ["level_s", "axes1"], ["level_2"], name="/level/Unsqueeze"),
             helper.make_node("Mul", ["noise", "level_2"], ["level_emb"], name="/level/Mul_1"),
             helper.make_node("Concat", ["noised", "level_emb"], ["noised_image_embeds"], axis=1, name="/Concat")]
    return nodes, inits


GRAPHS = {"unet": _unet_graph, "vae_encoder": _vae_encoder_graph, "vae_decoder": _vae_decoder_graph,
          "image_encoder": _image_encoder_graph, "image_noising": _image_noising_graph}


def make_model(io: ComponentIO, seed: int = 0) -> onnx.ModelProto:
    """A tiny ONNX model with exactly the component's IO."""
    rng = np.random.default_rng(seed)
    build = GRAPHS.get(io.component, _text_graph)
    nodes, inits = build(io, rng)
    graph = helper.make_graph(nodes, io.component, [_value_info(t) for t in io.inputs],
                              [_value_info(t) for t in io.outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def make_fake_export(family: str, folder: Path, components: tuple[str, ...] | None = None) -> Path:
    """Write an ONNX export folder (models, tokenizer/scheduler stand-ins, manifest) for a family."""
    spec = get_family(family)
    dims = fake_dims(family)
    ios = component_ios(spec, dims)
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for i, (name, io) in enumerate(ios.items()):
        if components is not None and name not in components:
            continue
        (folder / name).mkdir(exist_ok=True)
        onnx.save_model(make_model(io, seed=i), str(folder / name / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=256)
        entries[name] = {"path": f"{name}/model.onnx", "io": io_to_json(io), "sha256": sha256_tree(folder / name),
                         "size_mb": 0.1, "export_s": 0.0, "parity": {}}
    files = {}
    for te in spec.text_encoders:
        (folder / te.tokenizer).mkdir(exist_ok=True)
        (folder / te.tokenizer / "vocab.json").write_text(json.dumps({"a": 0}))
        files[te.tokenizer] = sha256_tree(folder / te.tokenizer)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    files["scheduler"] = sha256_tree(folder / "scheduler")
    if spec.image_encoder is not None:  # issue 12 (unCLIP): the image processor's config
        processor = folder / spec.image_encoder.processor
        processor.mkdir(exist_ok=True)
        (processor / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": dims.image_size},
            "crop_size": {"height": dims.image_size, "width": dims.image_size}}))
        files[spec.image_encoder.processor] = sha256_tree(processor)
    manifest = {
        "kind": ONNX_KIND, "schema": SCHEMA, "family": spec.id.value,
        "source": {"model": f"fake:{family}", "sha256": "0" * 64},
        "model": {"dims": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dims.__dict__.items()},
                  "vae_scaling_factor": spec.vae_scaling_factor},
        "opset": OPSET, "exporter": "hand-built", "tools": {}, "components": entries, "files": files,
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return folder
