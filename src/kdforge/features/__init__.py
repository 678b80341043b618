"""kdforge.features"""
