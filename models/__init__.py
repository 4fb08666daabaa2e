"""CTR models: FTRL logistic regression and factorization machines over hashed features, their
training (`bidder train`), artifacts and hot-reloaded serving (see docs/models.md)."""
