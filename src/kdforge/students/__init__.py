"""kdforge.students"""
