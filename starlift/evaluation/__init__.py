"""Measuring artifacts against the reference: parity (teacher-forced logits) and quality."""
