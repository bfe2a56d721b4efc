"""Run control both trainers call: everything about a run that is not tensor math.

- `events`: which update writes a checkpoint, validates, exports; epoch accounting.
- `checkpoints`: the checkpoint folder (layout, atomic commit, discovery, pruning); `manifest`:
  its file list with sizes and checksums, and the fsyncs.
- `output`: the output folder, checked writable before anything is trained.
- `resume`: what a changed flag means when a run resumes.
- `signals`: SIGTERM / Ctrl-C as a request to checkpoint and stop.
- `nonfinite`: when a non-finite update is skipped and when the run stops.
- `lr`, `ema`: numpy references of the LR at each update and the EMA decay.
- `task`: what each task conditions on, reads and computes.
- `validation`: what a validation round samples and where its grid goes.
- `report`: logging setup, tracker config, `train_summary.json`.
- `process`: the few collective operations a backend lends to the shared code.
"""
