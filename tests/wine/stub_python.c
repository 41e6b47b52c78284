/* A stand-in for python.exe / py.exe in the .bat launcher tests (built with mingw, run under wine).
   Logs "<its file name> <arguments>" to %FLUXDECK_LOG%; exits with the code %FLUXDECK_EXIT% scripts for it:
   entries "name|argument prefix=code" separated by ';' (first match wins, name "*" matches any; code may be
   negative, as a crash's 0xC0000005 reads in cmd). Plays an environment like the Linux fake does:
   "-m bootstrap env" copies itself to .venv\Scripts\python.exe (unless it is the bundle's python_embeded),
   "-m launcher --check-models" fails (3) until "-m bootstrap wizard" has run. */
#include <windows.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char args[8192];

static int scripted(const char *base, int *code) {
    const char *spec = getenv("FLUXDECK_EXIT");
    if (!spec) return 0;
    char copy[4096];
    strncpy(copy, spec, sizeof copy - 1);
    copy[sizeof copy - 1] = 0;
    for (char *entry = strtok(copy, ";"); entry; entry = strtok(NULL, ";")) {
        char *bar = strchr(entry, '|'), *eq = strrchr(entry, '=');
        if (!bar || !eq || eq < bar) continue;
        *bar = 0;
        *eq = 0;
        const char *prefix = bar + 1;
        if ((strcmp(entry, "*") == 0 || _stricmp(entry, base) == 0) && strncmp(args, prefix, strlen(prefix)) == 0) {
            *code = (int)strtoll(eq + 1, NULL, 0);
            return 1;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (i > 1) strncat(args, " ", sizeof args - strlen(args) - 1);
        strncat(args, argv[i], sizeof args - strlen(args) - 1);
    }
    wchar_t self[MAX_PATH];
    GetModuleFileNameW(NULL, self, MAX_PATH);
    const wchar_t *wbase = wcsrchr(self, L'\\');
    wbase = wbase ? wbase + 1 : self;
    char base[MAX_PATH];
    WideCharToMultiByte(CP_UTF8, 0, wbase, -1, base, sizeof base, NULL, NULL);
    const char *log = getenv("FLUXDECK_LOG");
    if (log) {
        FILE *f = fopen(log, "a");
        if (f) {
            fprintf(f, "%s %s\n", base, args);
            fclose(f);
        }
    }
    int code = 0;
    if (scripted(base, &code)) return code;
    if (strstr(args, "-m bootstrap env") && !wcsstr(self, L"\\python_embeded\\")) {
        CreateDirectoryW(L".venv", NULL);
        CreateDirectoryW(L".venv\\Scripts", NULL);
        CopyFileW(self, L".venv\\Scripts\\python.exe", TRUE);
    }
    if (strcmp(args, "-m launcher --check-models") == 0)
        return GetFileAttributesW(L"wizard-done") == INVALID_FILE_ATTRIBUTES ? 3 : 0;
    if (strcmp(args, "-m bootstrap wizard") == 0) {
        HANDLE h = CreateFileW(L"wizard-done", GENERIC_WRITE, 0, NULL, CREATE_ALWAYS, 0, NULL);
        CloseHandle(h);
    }
    return 0;
}
