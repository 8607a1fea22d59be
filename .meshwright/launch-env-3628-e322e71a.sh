export OMP_NUM_THREADS=1
export PYTHONPATH=/work/wt/signals2
