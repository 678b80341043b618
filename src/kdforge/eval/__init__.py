"""kdforge.eval"""
