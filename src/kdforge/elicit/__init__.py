"""kdforge.elicit"""
