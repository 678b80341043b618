"""kdforge.teachers"""
