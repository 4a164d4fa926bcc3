"""Deploy: evaluate a student, report on it, measure it, export, quantize and prune it."""
