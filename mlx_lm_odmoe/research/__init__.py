"""Offline research commands: collect routing traces, train and evaluate
predictors, simulate cache policies. Nothing here runs at decode time."""
