"""The quickstart's distillation step from Python, with the building blocks `hfdistill.run` uses (see run_recipe.py for the one-call form).

    python examples/python_api_digits.py

Offline: scikit-learn digits, a timm teacher and student built from their names.
"""

from hfdistill import DistillationConfig, DistillationTrainer, Recipe
from hfdistill.tasks import accuracy
from hfdistill.data import build_task_data, load_raw_data
from hfdistill.models import load_model
from hfdistill.recipe import DataSpec, ModelSpec

task = "image-classification"
raw = load_raw_data(DataSpec(name="sklearn-digits", image_size=16, validation_fraction=0.3), task)
labels = dict(enumerate(raw.label_names))
teacher = load_model(ModelSpec(name="timm:resnet18", pretrained=False), "teacher", task, raw.num_labels, labels, image_size=16)
student = load_model(ModelSpec(name="timm:test_efficientnet"), "student", task, raw.num_labels, labels, image_size=16)
data = build_task_data(raw, task, student, teacher)

# (An untrained teacher teaches nothing: train it first, e.g. with the same trainer and no teacher,
# or point `name` at a trained folder. Here it only shows the API.)
trainer = DistillationTrainer(
    model=student.model,
    teacher=teacher.model,
    recipe=Recipe.from_dict({"terms": [{"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}], "task_weight": 0.1}),
    args=DistillationConfig(output_dir="runs/example", max_steps=20, per_device_train_batch_size=64,
                            learning_rate=3e-3, report_to="none", remove_unused_columns=False, save_strategy="no"),
    train_dataset=data.train,
    eval_dataset=data.eval,
    data_collator=data.collator,
    teacher_inputs=data.teacher_inputs,  # re-normalises / resizes the student's pixels for the teacher
    compute_metrics=accuracy,
    id2label=data.id2label,
    timm_model_args=student.timm_model_args,
)
trainer.train()
print(trainer.evaluate())
trainer.save_model()  # runs/example: loads with pipeline("image-classification", model="runs/example")
