"""Deployment formats and checks against the engines that run them."""
