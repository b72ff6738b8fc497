"""A MONAI Label app serving medadapt models: pretrained backbone + adapters, loaded strictly.

Start it with ``medadapt label --studies DIR`` (needs the ``[label]`` extra). Modules:

- `specs`: what a served model is: a bundle's model exactly as its ``inference.json`` builds
  it (`BundleModel`), or the built-in LiteMedSAM box-prompt model (`BoxModel`).
- `imagefiles`: checking, reading and writing PNG/JPG images and NIfTI volumes.
- `labelmaps`: the box model's label maps and class scores.
- `errors`: bad input as MONAI Label exceptions that the app answers with 4xx.
- `infer_tasks`, `train_task`, `datastore`: the MONAI Label task and datastore classes.
- `main`: the `MONAILabelApp` subclass; `cli`: the ``medadapt label`` command.

Only `main`, `infer_tasks`, `train_task`, `datastore` and `errors` import ``monailabel``, so
the command and the model list work (and fail with a clear message) without the extra.
"""
