"""Analysis of prediction tables: scores with intervals and the report (`iap-eval`), the
post-hoc fitting beside the checkpoint (`iap-fit`) and domain sorting (`iap-sort`)."""
