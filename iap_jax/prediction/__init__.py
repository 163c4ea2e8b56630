"""Prediction: the engine (compiled forward, batching, reader), the prediction tables, the
post-hoc models it applies (calibration, header QA, out-of-domain score) and the
`iap-predict` command (predict_cli). Never imports training."""
