"""Backbone registry: name parsing and its errors, the packaged offline weights, local --weights files,
the tiny random CLIP, and download failures with no network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedstore.ingest.backbones import DEFAULT_BACKBONE, KNOWN_BACKBONES, BackboneName, load_backbone, parse_name
from embedstore.ingest.backbones.checkpoint import read_state_dict
from embedstore.ingest.backbones.offline import packaged_weights_path, positional_state_dict
from embedstore.errors import BackboneLoadError, UnknownBackboneError
from embedstore.samples import photo

from conftest import TINY_CLIP

PREFIX_HINT = "valid prefixes: openclip:ARCH/PRETRAINED, timm:MODEL[.TAG], offline:efficientnet_lite0"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, parsed",
    [
        ("openclip:ViT-B-32/laion2b_s34b_b79k", BackboneName("openclip", "ViT-B-32", "laion2b_s34b_b79k")),
        ("openclip:ViT-B-32", BackboneName("openclip", "ViT-B-32", None)),
        ("timm:vit_small_patch14_dinov2.lvd142m", BackboneName("timm", "vit_small_patch14_dinov2", "lvd142m")),
        ("timm:efficientnet_lite0", BackboneName("timm", "efficientnet_lite0", None)),
        ("offline:efficientnet_lite0", BackboneName("offline", "efficientnet_lite0", None)),
        ("  timm:resnet18  ", BackboneName("timm", "resnet18", None)),
    ],
)
def test_parse_valid_names_round_trip(name, parsed):
    assert parse_name(name) == parsed
    assert str(parse_name(name)) == name.strip()


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "empty backbone name"),
        ("   ", "empty backbone name"),
        ("efficientnet_lite0", "unknown backbone 'efficientnet_lite0'"),
        ("hf-hub:timm/resnet18", "unknown backbone 'hf-hub:timm/resnet18'"),
        ("clip:ViT-B-32/openai", "unknown backbone 'clip:ViT-B-32/openai'"),
        ("timm:", "has no model after 'timm:'"),
        ("openclip:", "has no model after 'openclip:'"),
        ("timm:resnet 18", "has no model after 'timm:'"),
    ],
)
def test_parse_unknown_names_list_valid_prefixes(name, fragment):
    with pytest.raises(UnknownBackboneError) as e:
        parse_name(name)
    msg = str(e.value)
    assert fragment in msg
    assert PREFIX_HINT in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("openclip:ViT-B-32/", "bad openclip name 'openclip:ViT-B-32/': use openclip:ARCH/PRETRAINED"),
        ("openclip:/laion2b_s34b_b79k", "bad openclip name"),
        ("openclip:ViT-B-32/a/b", "bad openclip name"),
        ("timm:timm/resnet18", "for a local checkpoint use --weights FILE"),
        ("timm:resnet18.", "bad timm name 'timm:resnet18.': use timm:MODEL[.TAG]"),
        ("timm:.a1_in1k", "bad timm name"),
        ("offline:resnet50", "unknown offline backbone 'offline:resnet50'; offline models: offline:efficientnet_lite0"),
        ("offline:", "has no model after 'offline:'"),
    ],
)
def test_parse_bad_forms(name, fragment):
    with pytest.raises(UnknownBackboneError, match=None) as e:
        parse_name(name)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_backbone_is_a_value_error():
    with pytest.raises(ValueError):
        load_backbone("nope:x")


def test_known_backbones_parse_and_default_is_offline():
    assert DEFAULT_BACKBONE == "offline:efficientnet_lite0"
    assert DEFAULT_BACKBONE in KNOWN_BACKBONES
    for name in KNOWN_BACKBONES:
        assert str(parse_name(name)) == name


def test_unknown_timm_model_is_named_not_a_download_error():
    with pytest.raises(UnknownBackboneError) as e:
        load_backbone("timm:no_such_model_xyz")
    msg = str(e.value)
    assert "timm has no model 'no_such_model_xyz'" in msg
    assert "\n" not in msg


def test_unknown_openclip_architecture():
    with pytest.raises(UnknownBackboneError, match="open_clip has no architecture 'NoSuchArch'"):
        load_backbone("openclip:NoSuchArch/openai")


def test_openclip_tag_missing_lists_tags():
    with pytest.raises(UnknownBackboneError) as e:
        load_backbone("openclip:ViT-B-32")
    msg = str(e.value)
    assert "openclip:ViT-B-32 needs weights: openclip:ViT-B-32/TAG" in msg
    assert "openai" in msg and "--weights FILE" in msg and "/random" in msg


def test_openclip_tag_unknown_lists_known_tags():
    with pytest.raises(UnknownBackboneError) as e:
        load_backbone("openclip:ViT-B-32/no_such_tag")
    msg = str(e.value)
    assert msg.startswith("open_clip has no weights 'no_such_tag' for ViT-B-32; known:")
    assert "laion2b_s34b_b79k" in msg and "\n" not in msg


# ---- the packaged offline backbone --------------------------------------------------------------
@pytest.fixture(scope="module")
def offline():
    return load_backbone("offline:efficientnet_lite0")


@pytest.fixture(scope="module")
def offline_full_model():
    """timm's efficientnet_lite0 with classifier, holding the packaged ImageNet weights."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(positional_state_dict(model, read_state_dict(packaged_weights_path())))
    return model.eval()


def test_offline_backbone_shape_norm_and_text_absent(offline):
    assert offline.dim == 1280 and not offline.has_text
    assert offline.preprocess.input_size == (3, 224, 224)
    X = offline.embed_images([photo("chelsea"), photo("coffee")])
    assert X.shape == (2, 1280) and X.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="has no text tower"):
        offline.embed_texts(["a cat"])


@pytest.mark.parametrize(
    "name, classes",
    [("chelsea", range(281, 286)), ("coffee", [967, 968, 504]), ("rocket", [657, 744])],  # cats; espresso/cup; missile
)
def test_offline_weights_are_real_imagenet_weights(offline, offline_full_model, name, classes):
    x = offline.transform()(photo(name)).unsqueeze(0)
    with torch.inference_mode():
        top = int(offline_full_model(x).argmax())
        # the backbone's pooled features are the full model's penultimate layer
        feats = offline.image_model(x)
        logits = offline_full_model.get_classifier()(feats)
    assert top in classes, f"{name} classified as {top}"
    assert int(logits.argmax()) == top


def test_offline_features_separate_photos(offline):
    """Real features: two views of the same photo are closer than views of different photos."""
    from embedstore.samples import photo_views

    rng = np.random.default_rng(0)
    cat = photo_views(photo("chelsea"), 2, rng)
    rocket = photo_views(photo("rocket"), 1, rng)
    X = offline.embed_images(cat + rocket)
    assert X[0] @ X[1] > X[0] @ X[2] + 0.1


def test_version_fingerprint_is_stable(offline):
    again = load_backbone("offline:efficientnet_lite0")
    assert again.version == offline.version
    assert len(offline.version) == 12
    d = offline.describe()
    assert d["version"] == offline.version and d["dim"] == 1280 and d["weights"] is None


# ---- local --weights files ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_checkpoint(tmp_path_factory, offline_full_model):
    """The packaged weights saved under timm's keys (classifier included), as a user's local file."""
    p = tmp_path_factory.mktemp("ckpt") / "efficientnet_lite0.pth"
    torch.save(offline_full_model.state_dict(), p)
    return p


def test_local_weights_give_same_vectors_as_offline(offline, lite0_checkpoint):
    bb = load_backbone("timm:efficientnet_lite0", weights=str(lite0_checkpoint))
    imgs = [photo("chelsea"), photo("astronaut")]
    np.testing.assert_allclose(bb.embed_images(imgs), offline.embed_images(imgs), atol=1e-5)
    assert bb.weights_path == str(lite0_checkpoint.resolve())
    assert bb.describe()["weights_id"].startswith("sha256:")
    assert bb.version != offline.version  # another name, another file


@pytest.mark.parametrize("form", ["wrapped", "safetensors"])
def test_local_weights_other_checkpoint_forms(offline, offline_full_model, tmp_path, form):
    sd = offline_full_model.state_dict()
    if form == "wrapped":  # a training checkpoint: {'state_dict': {'module.xxx': ...}, 'epoch': ...}
        p = tmp_path / "ckpt.pt"
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, p)
    else:
        from safetensors.torch import save_file

        p = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    bb = load_backbone("timm:efficientnet_lite0", weights=str(p))
    img = [photo("coffee")]
    np.testing.assert_allclose(bb.embed_images(img), offline.embed_images(img), atol=1e-5)


def test_version_differs_for_different_weights(lite0_checkpoint, offline_full_model, tmp_path):
    sd = {k: v.clone() for k, v in offline_full_model.state_dict().items()}
    first_conv = next(k for k in sd if k.endswith("conv_stem.weight"))
    sd[first_conv] += 0.01
    other = tmp_path / "tuned.pth"
    torch.save(sd, other)
    a = load_backbone("timm:efficientnet_lite0", weights=str(lite0_checkpoint))
    b = load_backbone("timm:efficientnet_lite0", weights=str(other))
    a2 = load_backbone("timm:efficientnet_lite0", weights=str(lite0_checkpoint))
    assert a.version != b.version
    assert a.version == a2.version


def test_checkpoint_that_does_not_fit_fails_in_one_line(tmp_path):
    import timm

    p = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), p)
    with pytest.raises(BackboneLoadError) as e:
        load_backbone("timm:efficientnet_lite0", weights=str(p))
    msg = str(e.value)
    assert f"checkpoint {p} does not fit this architecture" in msg
    assert "check the backbone name matches the checkpoint" in msg and "\n" not in msg


def test_unreadable_and_missing_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(BackboneLoadError) as e:
        load_backbone("timm:efficientnet_lite0", weights=str(junk))
    assert str(e.value).startswith(f"cannot read checkpoint {junk}") and "\n" not in str(e.value)
    with pytest.raises(BackboneLoadError, match="weights file not found: .*--weights"):
        load_backbone("timm:efficientnet_lite0", weights=str(tmp_path / "missing.pth"))


# ---- tiny random CLIP: shapes and the text path -------------------------------------------------
def test_tiny_clip_image_and_text_shapes():
    bb = load_backbone(TINY_CLIP)
    assert bb.has_text and bb.dim == 512
    assert bb.preprocess.input_size == (3, 224, 224) and bb.preprocess.crop_pct == 1.0
    X = bb.embed_images([photo("chelsea"), photo("horse"), photo("rocket")])
    T = bb.embed_texts(["a photo of a cat", "a horse"])
    assert X.shape == (3, 512) and T.shape == (2, 512)
    assert X.dtype == np.float32 and T.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(T, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(T[0], T[1])
    assert len(bb.version) == 12
    assert bb.describe()["weights_id"] == "random:seed0" and bb.describe()["text"] is True


# ---- no network -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm:resnet18.a1_in1k", "openclip:RN50/openai"])
def test_download_failure_is_one_line_naming_weights_and_offline(name, monkeypatch, tmp_path):
    """As on an air-gapped machine: HF_HUB_OFFLINE (set here the way huggingface_hub reads the environment
    variable) makes the hub fail at once instead of retrying; an empty cache makes sure nothing is found."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(BackboneLoadError) as e:
        load_backbone(name)
    msg = str(e.value)
    assert msg.startswith(f"could not load weights for {name} (")
    assert "--weights FILE" in msg and "offline:efficientnet_lite0" in msg and "\n" not in msg
