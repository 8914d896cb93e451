//! Per-tenant rate limits and budgets (in progress).
