"""Successful demonstrations from ManiSkill's motion planners, retargeted to the policy's control mode."""
