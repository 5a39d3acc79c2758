"""Successful demonstrations from ManiSkill's motion planners, retargeted to the policy's control mode, and from a
scripted pick-and-place controller for LIBERO's tasks."""
