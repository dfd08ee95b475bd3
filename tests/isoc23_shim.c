/* glibc 2.38's C23 names for strtoull and sscanf, for bochscpu's PyPI wheel
   on an older glibc (see bare_x86.py). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

unsigned long long __isoc23_strtoull(const char* s, char** end, int base) {
  return strtoull(s, end, base);
}

int __isoc23_sscanf(const char* s, const char* format, ...) {
  va_list args;
  va_start(args, format);
  const int n = vsscanf(s, format, args);
  va_end(args);
  return n;
}
