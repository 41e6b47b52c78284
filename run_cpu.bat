@echo off
rem FluxDeck on the CPU. Works from whatever the current directory is, and keeps the window open on error.
rem First run: builds the Python environment (python -m bootstrap env --cpu) and opens the download
rem wizard when no model is installed. Later runs open the TUI at once. Extra arguments go to the TUI.
rem No parenthesised blocks below: cmd expands %VAR% in a block when it reads the block, and a folder name
rem such as "Flux Deck (x86)" would end one. Any exit code but 0 (a crash's negative one too) is an error.
setlocal
cd /d "%~dp0"
call :find_env_python
if defined ENVPY goto :have_env
echo First run: building FluxDeck's Python environment, this takes a few minutes...
call :find_system_python
if defined STOREPY goto :store_python
if not defined SYSPY goto :no_python
call %SYSPY% -m bootstrap env --cpu
if not "%ERRORLEVEL%"=="0" goto :error
call :find_env_python
if not defined ENVPY goto :not_created

:have_env
rem The portable bundle ships python_embeded without packages: bring the environment up to date on every
rem start (a no-op, in about a second, when it is ready).
"%ENVPY%" -m bootstrap env --cpu
if not "%ERRORLEVEL%"=="0" goto :error
"%ENVPY%" -m launcher --check-models
if "%ERRORLEVEL%"=="0" goto :run
"%ENVPY%" -m bootstrap wizard
if not "%ERRORLEVEL%"=="0" goto :error

:run
"%ENVPY%" -m launcher --cpu %*
if not "%ERRORLEVEL%"=="0" goto :error
exit /b 0

:find_env_python
set "ENVPY="
if exist "%~dp0python_embeded\python.exe" set "ENVPY=%~dp0python_embeded\python.exe"
if not defined ENVPY if exist "%~dp0.venv\Scripts\python.exe" set "ENVPY=%~dp0.venv\Scripts\python.exe"
exit /b 0

:find_system_python
rem The Python launcher with a version the pins support first; then python.exe on PATH, unless it is the
rem Microsoft Store's alias (in WindowsApps; it answers 9009 and opens the Store instead of running).
set "SYSPY="
set "STOREPY="
call :try_py 3.12
if not defined SYSPY call :try_py 3.11
if defined SYSPY exit /b 0
set "PYEXE="
for %%I in (python.exe) do set "PYEXE=%%~$PATH:I"
if not defined PYEXE exit /b 0
if not "%PYEXE:\WindowsApps\=%"=="%PYEXE%" set "STOREPY=1"
if defined STOREPY exit /b 0
"%PYEXE%" -c "import sys" >nul 2>nul
if "%ERRORLEVEL%"=="9009" set "STOREPY=1"
if not defined STOREPY set SYSPY="%PYEXE%"
exit /b 0

:try_py
py -%1 -c "import sys" >nul 2>nul
if "%ERRORLEVEL%"=="0" set "SYSPY=py -%1"
exit /b 0

:store_python
echo Only the Microsoft Store's "python" shortcut was found, not a Python. Install Python 3.12 from
echo https://www.python.org/downloads/ (tick "Add python.exe to PATH"), or use the portable bundle, then start this again.
goto :error

:no_python
echo No Python was found. Install Python 3.12 from https://www.python.org/downloads/
echo (tick "Add python.exe to PATH"), or use the portable bundle, then start this again.
goto :error

:not_created
echo The Python environment was not created: see the messages above.
goto :error

:error
echo.
echo FluxDeck stopped with an error (see above).
pause
exit /b 1
