"""Failure understanding (issue 23): why episodes fail (causes, labels), a runtime alarm that warns while an
episode can still be saved (signals, conformal, alarm, monitor, intervention, study: ``afil-ray alarm``), and
ARMOR's detector-explainer that says whether and why an episode failed (explainer, armor, dataset, quality,
explain: ``afil-ray explain``)."""
