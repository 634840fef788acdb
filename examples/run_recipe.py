"""A whole run from Python: what `hfdistill train RECIPE` does, in one call, on a two-stage recipe.

    python examples/run_recipe.py

Offline, about two minutes on 2 CPU cores: scikit-learn digits, a ResNet-18 teacher trained first, a tiny
timm student. Stage `hint` trains the student's first layers and a regressor to match the teacher's layer2
(FitNets' hint stage); stage `distill` then trains the whole student with KD from those weights. It shows
the API, not tuned settings (recipes/fashion_mnist/fitnet_two_stage.yaml is the benchmarked recipe).
"""

import hfdistill
from hfdistill.run import check

recipe = hfdistill.Recipe.from_dict({
    "task": "image-classification",
    "teacher": {"name": "runs/example_two_stage/teacher",            # trained first when the folder is missing
                "train_from": {"name": "timm:resnet18", "pretrained": False},
                "train_args": {"num_train_epochs": 10}},
    "student": {"name": "timm:test_resnet"},                         # `baseline: true` also trains it alone
    "data": {"name": "sklearn-digits", "image_size": 16, "max_train_samples": 300},
    "stages": [
        {"name": "hint", "task_weight": 0,
         "terms": [{"loss": "fitnet", "weight": 1, "student": "layer2", "teacher": "layer2", "adapter": "conv_reg"}],
         "train": ["student.conv1", "student.bn1", "student.layer1", "student.layer2", "adapters"],
         "training": {"num_train_epochs": 3}},
        {"name": "distill", "task_weight": 0.1, "terms": [{"loss": "kd", "weight": 0.9, "params": {"temperature": 4}}]},
    ],
    "training": {"output_dir": "runs/example_two_stage/student", "num_train_epochs": 10, "learning_rate": 0.003,
                 "per_device_train_batch_size": 64, "save_strategy": "epoch", "save_total_limit": 1},
})

print(check(recipe).text)           # models, data, every stage's terms and tapped shapes; nothing trained or written
result = hfdistill.run(recipe)      # prints each job and stage as it starts, then the summary
print(result.output_dir, result.metrics["eval_accuracy"], [(s.name, s.global_step) for s in result.stages])
# Interrupted? The same call with overrides={"training.resume_from_checkpoint": True} loads the completed
# stages from runs/example_two_stage/student-stages/ and resumes the interrupted one at its last checkpoint.
