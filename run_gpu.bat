@echo off
rem FluxDeck on the GPU (NVIDIA CUDA; falls back to the CPU). Works from whatever the current directory is, and keeps the window open on error.
rem First run: builds the Python environment (python -m bootstrap env --gpu) and opens the download
rem wizard when no model is installed. Later runs open the TUI at once. Extra arguments go to the TUI.
setlocal
cd /d "%~dp0"
call :find_env_python
if not defined ENVPY (
  echo First run: building FluxDeck's Python environment, this takes a few minutes...
  call :find_system_python
  if not defined SYSPY (
    echo No Python was found. Install Python 3.11 from https://www.python.org/ or use the portable bundle.
    goto :error
  )
  %SYSPY% -m bootstrap env --gpu
  if errorlevel 1 goto :error
  call :find_env_python
)
if not defined ENVPY (
  echo The Python environment was not created: see the messages above.
  goto :error
)
rem The portable bundle ships python_embeded without packages: bring the environment up to date on every
rem start (a no-op, in about a second, when it is ready).
"%ENVPY%" -m bootstrap env --gpu
if errorlevel 1 goto :error
"%ENVPY%" -m launcher --check-models
if errorlevel 1 (
  "%ENVPY%" -m bootstrap wizard
  if errorlevel 1 goto :error
)
"%ENVPY%" -m launcher %*
if errorlevel 1 goto :error
exit /b 0

:find_env_python
set "ENVPY="
if exist "%~dp0python_embeded\python.exe" set "ENVPY=%~dp0python_embeded\python.exe"
if not defined ENVPY if exist "%~dp0.venv\Scripts\python.exe" set "ENVPY=%~dp0.venv\Scripts\python.exe"
exit /b 0

:find_system_python
set "SYSPY="
where py >nul 2>nul
if not errorlevel 1 (
  set "SYSPY=py -3"
  exit /b 0
)
where python >nul 2>nul
if not errorlevel 1 set "SYSPY=python"
exit /b 0

:error
echo.
echo FluxDeck stopped with an error (see above).
pause
exit /b 1
