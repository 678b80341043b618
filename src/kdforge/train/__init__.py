"""kdforge.train"""
