"""kdforge.data"""
