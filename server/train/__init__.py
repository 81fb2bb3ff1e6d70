"""`promptserve train`: from a data file to a served task (PEFT on the frozen backbone, one training loop)."""
