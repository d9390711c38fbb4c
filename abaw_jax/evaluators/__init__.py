"""Evaluation libraries. They take a predict function (a batch of named inputs -> per-frame
outputs) and never import a trainer: `split` predicts every record of a split, `abaw` turns
predictions into ABAW metrics, post-processing, prediction files and plots."""
