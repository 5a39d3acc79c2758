"""Failure detection (issue 23): runtime failure scores and the calibrated alarm that reads them."""
