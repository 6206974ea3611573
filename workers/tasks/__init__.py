"""The tasks Tuneforge trains, one package each (`text_classification/`, `speech_recognition/` ...).

A task package's `__init__` holds its light definition (spec fields, metrics, Predict input kind, CLI flags: no
torch, so the server and the client read it) and its `runtime` module everything that needs torch (data, model,
loss, evaluation, Predict, export samples, report sections). `registry` finds the packages; nothing else in the
service names a task.
"""
