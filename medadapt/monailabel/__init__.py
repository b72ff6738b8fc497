"""A MONAI Label app serving medadapt models: pretrained backbone + adapters, loaded strictly.

Start it with ``medadapt label --studies DIR`` (needs the ``[label]`` extra). Modules:

- `specs`: what a served model is (`ModelSpec`), read from the bundles in ``bundles/``, a JSON
  config file, or built in (the LiteMedSAM box-prompt model).
- `imagefiles`: checking, reading and writing PNG/JPG images and NIfTI volumes.
- `labelmaps`: network outputs to label maps (BraTS TC/WT/ET to the release's values).
- `errors`: bad input as MONAI Label exceptions that the app answers with 4xx.
- `infer_tasks`, `train_task`, `datastore`: the MONAI Label task and datastore classes.
- `main`: the `MONAILabelApp` subclass; `cli`: the ``medadapt label`` command.

Only `main`, `infer_tasks`, `train_task`, `datastore` and `errors` import ``monailabel``, so
the command and the specs work (and fail with a clear message) without the extra.
"""
