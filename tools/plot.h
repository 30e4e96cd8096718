/* A tiny raster drawing kit for the CLI's pictures (tools/plot.c): an RGB canvas as an mmb_image (so
 * mmb_image_write_png writes it), filled rectangles, lines, discs, a 5x7 bitmap font, a heat colour map and
 * an alpha blend. No state; every call clips to the canvas. */
#ifndef MMB_PLOT_H
#define MMB_PLOT_H

#include "mmbridge.h"

/* A width x height canvas filled with bg (malloc'd rgb: mmb_image_free frees it). 0, or 1 out of memory. */
int plot_new(mmb_image *c, int width, int height, const unsigned char bg[3]);
void plot_rect(mmb_image *c, int x, int y, int w, int h, const unsigned char col[3]);
/* A 1-pixel line from (x0, y0) to (x1, y1), ends included (Bresenham). */
void plot_line(mmb_image *c, int x0, int y0, int x1, int y1, const unsigned char col[3]);
/* A filled disc of radius r centred on (cx, cy). */
void plot_disc(mmb_image *c, int cx, int cy, int r, const unsigned char col[3]);
/* Text in the 5x7 font (printable ASCII; others drawn as '?'), each glyph 6 x 8 pixels times scale, its top
 * left at (x, y); plot_text_width is its width in pixels. */
void plot_text(mmb_image *c, int x, int y, const char *s, int scale, const unsigned char col[3]);
int plot_text_width(const char *s, int scale);
/* The heat map's colour of t in [0, 1] (clamped; NaN is 0): dark blue, blue, cyan, yellow, red, dark red. */
void plot_heat(float t, unsigned char out[3]);
/* Pixel (x, y) = (1 - a) * pixel + a * col. */
void plot_blend(mmb_image *c, int x, int y, const unsigned char col[3], float a);
/* "Nice" axis ticks over [lo, hi]: a step of 1, 2 or 5 times a power of ten giving about `want` ticks; sets
 * *first (the first multiple of the step >= lo) and returns the step. */
double plot_ticks(double lo, double hi, int want, double *first);

#endif
